//! CRI-O and podman (containers/image): one generated drop-in,
//! `/etc/containers/registries.conf.d/50-pullthrough.conf`, with a
//! `[[registry]]` per registry name and a path-prefix mirror
//! `<proxy>/<host>` (the proxy routes on that leading path segment).
//! containers/image falls back to the registry itself when the mirror fails.
//!
//! containers/image merges registries.conf and its drop-ins by prefix, a
//! later `[[registry]]` replacing an earlier one whole: so what an admin
//! set for one of these prefixes (a `location` rewrite, `insecure`, their
//! own mirrors, `mirror-by-digest-only`) is carried into the agent's entry,
//! its mirrors after the proxy, and a `blocked` registry is left out.

use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, value};

use super::{GENERATED_HEADER, PatchError};

/// The drop-in the agent owns.
pub const DROP_IN: &str = "/etc/containers/registries.conf.d/50-pullthrough.conf";
/// The main file, read before every drop-in.
pub const REGISTRIES_CONF: &str = "/etc/containers/registries.conf";
/// The drop-in directory, read in name order.
pub const DROP_IN_DIR: &str = "/etc/containers/registries.conf.d";

/// An admin's `[[registry]]` for a prefix, as containers/image reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminEntry {
    /// The file it is in.
    pub file: String,
    pub location: Option<String>,
    pub insecure: bool,
    pub blocked: bool,
    pub digest_only: bool,
    pub mirrors: Vec<AdminMirror>,
}

/// One of an admin's mirrors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminMirror {
    pub location: String,
    pub insecure: bool,
    pub pull_from_mirror: Option<String>,
}

/// The `[[registry]]` entries of a registries.conf file (version 2), by
/// prefix (the location when no prefix is given); for a file in the v1
/// format, the entries containers/image makes of it.
pub fn admin_entries(file: &str, bytes: &[u8]) -> Result<Vec<(String, AdminEntry)>, PatchError> {
    let text = std::str::from_utf8(bytes).map_err(|_| PatchError::new("is not UTF-8 text"))?;
    let doc = text.parse::<DocumentMut>().map_err(|e| {
        PatchError::new(format!(
            "is not valid TOML ({}); CRI-O and podman would not read it either",
            e.to_string().trim()
        ))
    })?;
    let Some(regs) = doc.get("registry") else {
        return v1_entries(file, &doc);
    };
    let regs = regs
        .as_array_of_tables()
        .ok_or_else(|| PatchError::new("`registry` is not an array of tables ([[registry]])"))?;
    let text_of = |t: &Table, k: &str| t.get(k).and_then(Item::as_str).map(str::to_string);
    let flag = |t: &Table, k: &str| t.get(k).and_then(Item::as_bool).unwrap_or(false);
    let mut out = Vec::new();
    for t in regs.iter() {
        let location = text_of(t, "location");
        let Some(prefix) = text_of(t, "prefix").or_else(|| location.clone()) else {
            continue;
        };
        let mirrors = t
            .get("mirror")
            .and_then(Item::as_array_of_tables)
            .map(|ms| {
                ms.iter()
                    .filter_map(|m| {
                        Some(AdminMirror {
                            location: text_of(m, "location")?,
                            insecure: flag(m, "insecure"),
                            pull_from_mirror: text_of(m, "pull-from-mirror"),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push((
            prefix,
            AdminEntry {
                file: file.to_string(),
                location,
                insecure: flag(t, "insecure"),
                blocked: flag(t, "blocked"),
                digest_only: flag(t, "mirror-by-digest-only"),
                mirrors,
            },
        ));
    }
    Ok(out)
}

/// The entries containers/image makes of a v1 registries.conf
/// (`[registries.insecure]`, `[registries.block]`, each with a
/// `registries` list): one per name, prefix and location alike. The
/// agent's drop-in replaces such an entry as it would a `[[registry]]`,
/// so what they say has to be carried the same way.
fn v1_entries(file: &str, doc: &DocumentMut) -> Result<Vec<(String, AdminEntry)>, PatchError> {
    let Some(v1) = doc.get("registries") else {
        return Ok(Vec::new());
    };
    let v1 = v1.as_table_like().ok_or_else(|| {
        PatchError::new("`registries` is not a table of the v1 format ([registries.block] …)")
    })?;
    let mut out: Vec<(String, AdminEntry)> = Vec::new();
    for (list, blocked) in [("insecure", false), ("block", true)] {
        let Some(names) = v1
            .get(list)
            .and_then(Item::as_table_like)
            .and_then(|t| t.get("registries"))
        else {
            continue;
        };
        let not_strings = || {
            PatchError::new(format!(
                "`registries.{list}.registries` is not an array of strings"
            ))
        };
        for name in names.as_array().ok_or_else(not_strings)?.iter() {
            let name = name.as_str().ok_or_else(not_strings)?.to_string();
            let i = match out.iter().position(|(p, _)| *p == name) {
                Some(i) => i,
                None => {
                    out.push((
                        name.clone(),
                        AdminEntry {
                            file: file.to_string(),
                            location: Some(name),
                            ..AdminEntry::default()
                        },
                    ));
                    out.len() - 1
                }
            };
            let e = &mut out[i].1;
            if blocked {
                e.blocked = true;
            } else {
                e.insecure = true;
            }
        }
    }
    Ok(out)
}

/// One registry name routed through the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrioRegistry {
    /// The name in image references (`quay.io`, an alias, `docker.io`).
    pub prefix: String,
    /// Mirror location: `<proxy authority>/<registry host>`.
    pub mirror: String,
    /// The mirror speaks plain HTTP.
    pub insecure: bool,
    /// Where the proxy fetches this registry from (`host[:port][/path]`).
    pub upstream: String,
    /// What an earlier file set for this prefix, kept.
    pub admin: Option<AdminEntry>,
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
        let admin = r.admin.clone().unwrap_or_default();
        let mut t = Table::new();
        t.insert("prefix", value(r.prefix.as_str()));
        t.insert(
            "location",
            value(admin.location.as_deref().unwrap_or(&r.prefix)),
        );
        if admin.insecure {
            t.insert("insecure", value(true));
        }
        if admin.digest_only {
            t.insert("mirror-by-digest-only", value(true));
        }
        let mut mirror = Table::new();
        mirror.insert("location", value(r.mirror.as_str()));
        if r.insecure {
            mirror.insert("insecure", value(true));
        }
        let mut mirrors = ArrayOfTables::new();
        mirrors.push(mirror);
        for m in &admin.mirrors {
            let mut mirror = Table::new();
            mirror.insert("location", value(m.location.as_str()));
            if m.insecure {
                mirror.insert("insecure", value(true));
            }
            if let Some(p) = &m.pull_from_mirror {
                mirror.insert("pull-from-mirror", value(p.as_str()));
            }
            mirrors.push(mirror);
        }
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
    let got: Vec<(String, String, bool)> = doc
        .get("registry")
        .and_then(Item::as_array_of_tables)
        .map(|a| {
            a.iter()
                .filter_map(|t| {
                    let m = t.get("mirror")?.as_array_of_tables()?.get(0)?;
                    Some((
                        t.get("prefix")?.as_str()?.to_string(),
                        m.get("location")?.as_str()?.to_string(),
                        m.get("insecure").and_then(Item::as_bool).unwrap_or(false),
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    let want: Vec<_> = want
        .iter()
        .map(|r| (r.prefix.clone(), r.mirror.clone(), r.insecure))
        .collect();
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
                upstream: String::new(),
                admin: None,
            },
            CrioRegistry {
                prefix: "docker.io".into(),
                mirror: "10.0.0.5/docker.io".into(),
                insecure: false,
                upstream: String::new(),
                admin: None,
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
            upstream: String::new(),
            admin: None,
        }])
        .unwrap()
        .unwrap();
        assert!(String::from_utf8(out).unwrap().contains("insecure = true"));
    }
}
