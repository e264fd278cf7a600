//! CRI-O and podman (containers/image): one generated drop-in,
//! `/etc/containers/registries.conf.d/50-pullthrough.conf`, with a
//! `[[registry]]` per registry name and a path-prefix mirror
//! `<proxy>/<host>` (the proxy routes on that leading path segment).
//! containers/image falls back to the registry itself when the mirror fails.

use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, value};

use super::{GENERATED_HEADER, PatchError};

/// The drop-in the agent owns.
pub const DROP_IN: &str = "/etc/containers/registries.conf.d/50-pullthrough.conf";

/// One registry name routed through the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrioRegistry {
    /// The name in image references (`quay.io`, an alias, `docker.io`).
    pub prefix: String,
    /// Mirror location: `<proxy authority>/<registry host>`.
    pub mirror: String,
    /// The mirror speaks plain HTTP.
    pub insecure: bool,
}

/// The drop-in's bytes (`None` when there is nothing to route).
pub fn drop_in(registries: &[CrioRegistry]) -> Result<Option<Vec<u8>>, PatchError> {
    if registries.is_empty() {
        return Ok(None);
    }
    let mut doc = DocumentMut::new();
    doc.decor_mut().set_prefix(format!("{GENERATED_HEADER}\n"));
    let mut regs = ArrayOfTables::new();
    for r in registries {
        let mut t = Table::new();
        t.insert("prefix", value(r.prefix.as_str()));
        t.insert("location", value(r.prefix.as_str()));
        let mut mirror = Table::new();
        mirror.insert("location", value(r.mirror.as_str()));
        if r.insecure {
            mirror.insert("insecure", value(true));
        }
        let mut mirrors = ArrayOfTables::new();
        mirrors.push(mirror);
        t.insert("mirror", Item::ArrayOfTables(mirrors));
        regs.push(t);
    }
    doc.insert("registry", Item::ArrayOfTables(regs));
    let out = doc.to_string().into_bytes();
    check(&out, registries)?;
    Ok(Some(out))
}

/// Parse-back check: the same registries and mirrors, as containers/image
/// would read them.
fn check(bytes: &[u8], want: &[CrioRegistry]) -> Result<(), PatchError> {
    let text = std::str::from_utf8(bytes).map_err(|_| PatchError::new("not UTF-8"))?;
    let doc = text
        .parse::<DocumentMut>()
        .map_err(|e| PatchError::new(format!("internal error: drop-in is not TOML: {e}")))?;
    let got: Vec<CrioRegistry> = doc
        .get("registry")
        .and_then(Item::as_array_of_tables)
        .map(|a| {
            a.iter()
                .filter_map(|t| {
                    let m = t.get("mirror")?.as_array_of_tables()?.get(0)?;
                    Some(CrioRegistry {
                        prefix: t.get("prefix")?.as_str()?.to_string(),
                        mirror: m.get("location")?.as_str()?.to_string(),
                        insecure: m.get("insecure").and_then(Item::as_bool).unwrap_or(false),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    if got != want {
        return Err(PatchError::new(format!(
            "internal error: drop-in reads back as {got:?}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_registry_block_per_name_with_a_path_prefix_mirror() {
        let out = drop_in(&[
            CrioRegistry {
                prefix: "quay.io".into(),
                mirror: "10.0.0.5/quay.io".into(),
                insecure: false,
            },
            CrioRegistry {
                prefix: "docker.io".into(),
                mirror: "10.0.0.5/docker.io".into(),
                insecure: false,
            },
        ])
        .unwrap()
        .unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text,
            format!(
                "{GENERATED_HEADER}\n[[registry]]\nprefix = \"quay.io\"\nlocation = \"quay.io\"\n\n[[registry.mirror]]\nlocation = \"10.0.0.5/quay.io\"\n\n[[registry]]\nprefix = \"docker.io\"\nlocation = \"docker.io\"\n\n[[registry.mirror]]\nlocation = \"10.0.0.5/docker.io\"\n"
            )
        );
        assert_eq!(drop_in(&[]).unwrap(), None);
    }

    #[test]
    fn plain_http_mirrors_are_marked_insecure() {
        let out = drop_in(&[CrioRegistry {
            prefix: "quay.io".into(),
            mirror: "10.0.0.5:8080/quay.io".into(),
            insecure: true,
        }])
        .unwrap()
        .unwrap();
        assert!(String::from_utf8(out).unwrap().contains("insecure = true"));
    }
}
