//! containerd's generated `<config_path>/<host>/hosts.toml`: the upstream
//! as `server`, the proxy (and any migrated mirrors) as hosts tried before
//! it, each checked by reading it back as containerd would.

use toml_edit::{Array, DocumentMut, Item, Table, value};

use super::{GENERATED_HEADER, PatchError, parse_containerd_toml as parse};

/// TLS settings of one host (or the `server`) in a hosts.toml.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HostTls {
    pub ca: Option<String>,
    pub client: Option<(String, String)>,
    pub skip_verify: Option<bool>,
}

/// One `[host."<url>"]` entry of a hosts.toml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorHost {
    pub url: String,
    /// CA file, relative to the hosts.toml directory or absolute.
    pub tls: HostTls,
}

/// The `server` a hosts.toml names for a registry: its upstream
/// (`docker.io` is served from `registry-1.docker.io`).
pub fn server_for(host: &str, upstream: Option<&str>) -> String {
    match upstream {
        Some(u) => u.trim_end_matches('/').to_string(),
        None if host == pullthrough_api::names::DOCKER_HUB => "https://registry-1.docker.io".into(),
        None => format!("https://{host}"),
    }
}

/// The directory name containerd looks up for a registry name (`*` → the
/// catch-all `_default`).
pub fn host_dir_name(name: &str) -> &str {
    if name == "*" { "_default" } else { name }
}

/// A generated hosts.toml: header, `server`, then each mirror host with
/// `capabilities = ["pull", "resolve"]`, tried in order before `server`.
pub fn hosts_toml(
    server: &str,
    server_tls: &HostTls,
    hosts: &[MirrorHost],
) -> Result<Vec<u8>, PatchError> {
    if hosts.is_empty() {
        // containerd rejects a host tree without hosts and silently pulls
        // upstream: never write one.
        return Err(PatchError::new(
            "internal error: hosts.toml without a mirror host",
        ));
    }
    let mut doc = DocumentMut::new();
    doc.decor_mut().set_prefix(format!("{GENERATED_HEADER}\n"));
    doc.insert("server", value(server));
    put_tls(doc.as_table_mut(), server_tls);
    let mut host_table = Table::new();
    host_table.set_implicit(true);
    for h in hosts {
        host_table.insert(&h.url, Item::Table(host_entry(h)));
    }
    doc.insert("host", Item::Table(host_table));
    let out = doc.to_string().into_bytes();
    check_hosts_toml(&out, server, hosts.len())?;
    Ok(out)
}

/// A mirror host's table: pull and resolve through it, with its TLS
/// settings.
fn host_entry(h: &MirrorHost) -> Table {
    let mut t = Table::new();
    let mut caps = Array::new();
    caps.push("pull");
    caps.push("resolve");
    t.insert("capabilities", value(caps));
    put_tls(&mut t, &h.tls);
    t
}

fn put_tls(t: &mut Table, tls: &HostTls) {
    if let Some(ca) = &tls.ca {
        t.insert("ca", value(ca.as_str()));
    }
    if let Some((cert, key)) = &tls.client {
        let mut pair = Array::new();
        pair.push(cert.as_str());
        pair.push(key.as_str());
        let mut outer = Array::new();
        outer.push(pair);
        t.insert("client", value(outer));
    }
    if let Some(skip) = tls.skip_verify {
        t.insert("skip_verify", value(skip));
    }
}

/// Parse-back check of a hosts.toml, as containerd reads it.
pub fn check_hosts_toml(bytes: &[u8], server: &str, hosts: usize) -> Result<(), PatchError> {
    let doc = parse(bytes)?;
    if doc.get("server").and_then(Item::as_str) != Some(server) {
        return Err(PatchError::new(
            "internal error: hosts.toml `server` does not read back",
        ));
    }
    let got = doc
        .get("host")
        .and_then(Item::as_table_like)
        .map(|t| {
            t.iter()
                .filter(|(_, h)| {
                    h.as_table_like()
                        .and_then(|h| h.get("capabilities"))
                        .and_then(Item::as_array)
                        .is_some_and(|a| !a.is_empty())
                })
                .count()
        })
        .unwrap_or(0);
    if got != hosts || hosts == 0 {
        return Err(PatchError::new(format!(
            "internal error: hosts.toml reads back with {got} mirror hosts, expected {hosts}"
        )));
    }
    Ok(())
}

/// An admin's own hosts.toml with the proxy added as the first host tried
/// (containerd tries hosts in file order, then `server`): everything they
/// wrote — `server`, their hosts and each setting — stays as it is. Run
/// again on its own output it gives the same bytes.
///
/// Hosts written as inline tables (`[host]` then `"https://a" = {…}`),
/// dotted keys (`host."https://a".capabilities = […]`) or a `host = {…}`
/// value are rewritten as `[host."…"]` tables, in the same order and with
/// the same settings: only a table's position can put the proxy before
/// them, and containerd reads both forms alike.
pub fn merge(current: &[u8], proxy: &MirrorHost) -> Result<Vec<u8>, PatchError> {
    let mut doc = parse(current)?;
    let mut t = host_entry(proxy);
    normalize_hosts(&mut doc)?;
    let hosts = host_table(&mut doc)?;
    hosts.remove(&proxy.url);
    // Before every other host: containerd orders them by position.
    let first = hosts
        .iter()
        .filter_map(|(_, h)| h.as_table().and_then(Table::position))
        .min();
    let last = doc
        .as_table()
        .iter()
        .filter_map(|(_, i)| i.as_table().and_then(Table::position))
        .max();
    t.set_position(match (first, last) {
        (Some(p), _) => Some(p - 1),
        (None, Some(p)) => Some(p + 1),
        (None, None) => None,
    });
    host_table(&mut doc)?.insert(&proxy.url, Item::Table(t));
    let out = doc.to_string().into_bytes();
    let back = parse(&out)?;
    if first_host(&back).as_deref() != Some(proxy.url.as_str()) {
        return Err(PatchError::new(
            "internal error: the proxy does not read back as the first host",
        ));
    }
    Ok(out)
}

/// Makes every `host` entry a `[host."…"]` table with a position, when
/// one is not: an inline table or dotted keys has no position, so
/// nothing could be put before it. Entries keep their order (the order
/// they were read in, which is the file's), their subtables follow them.
fn normalize_hosts(doc: &mut DocumentMut) -> Result<(), PatchError> {
    let positioned = |h: &Item| {
        h.as_table()
            .is_some_and(|t| !t.is_dotted() && t.position().is_some())
    };
    let needed = match doc.get("host") {
        None => false,
        Some(Item::Table(t)) => t.is_dotted() || !t.iter().all(|(_, h)| positioned(h)),
        Some(Item::Value(v)) => v.is_inline_table(),
        Some(_) => false,
    };
    if !needed {
        return Ok(());
    }
    if let Some(item) = doc.get_mut("host")
        && let Item::Value(toml_edit::Value::InlineTable(_)) = item
    {
        let taken = std::mem::take(item);
        if let Item::Value(toml_edit::Value::InlineTable(it)) = taken {
            *item = Item::Table(it.into_table());
        }
    }
    let mut next = max_position(doc.as_table()).map_or(0, |p| p + 1);
    let hosts = host_table(doc)?;
    hosts.set_dotted(false);
    hosts.set_implicit(true);
    let keys: Vec<String> = hosts.iter().map(|(k, _)| k.to_string()).collect();
    for k in keys {
        let Some(item) = hosts.get_mut(&k) else {
            continue;
        };
        if let Item::Value(toml_edit::Value::InlineTable(_)) = item {
            let taken = std::mem::take(item);
            if let Item::Value(toml_edit::Value::InlineTable(it)) = taken {
                *item = Item::Table(it.into_table());
            }
        }
        let Some(t) = item.as_table_mut() else {
            return Err(PatchError::new(format!(
                "`host.\"{k}\"` is not a table; the agent edits only [host.\"<url>\"] entries"
            )));
        };
        t.set_dotted(false);
        t.set_implicit(false);
        // The spacing of `"…" = ` or a dotted key would end up inside
        // the new header.
        t.decor_mut().clear();
        renumber(t, &mut next);
        if let Some(mut key) = hosts.key_mut(&k) {
            key.leaf_decor_mut().clear();
            key.dotted_decor_mut().clear();
        }
    }
    Ok(())
}

/// Gives `t` and its subtables positions from `next` on, in order.
fn renumber(t: &mut Table, next: &mut isize) {
    t.set_position(Some(*next));
    *next += 1;
    for (_, item) in t.iter_mut() {
        if let Some(sub) = item.as_table_mut()
            && !sub.is_dotted()
        {
            renumber(sub, next);
        }
    }
}

/// The highest position of any table in `t`, subtables included.
fn max_position(t: &Table) -> Option<isize> {
    t.iter()
        .filter_map(|(_, i)| i.as_table())
        .flat_map(|sub| [sub.position(), max_position(sub)])
        .flatten()
        .max()
}

/// An admin's hosts.toml without the proxy host [`merge`] added.
pub fn unmerge(current: &[u8], proxy_url: &str) -> Result<Vec<u8>, PatchError> {
    let mut doc = parse(current)?;
    if let Some(hosts) = doc.get_mut("host").and_then(Item::as_table_like_mut) {
        hosts.remove(proxy_url);
    }
    Ok(doc.to_string().into_bytes())
}

/// The `host` table, created (implicit) when missing.
fn host_table(doc: &mut DocumentMut) -> Result<&mut Table, PatchError> {
    let item = doc.entry("host").or_insert_with(|| {
        let mut t = Table::new();
        t.set_implicit(true);
        Item::Table(t)
    });
    item.as_table_mut().ok_or_else(|| {
        PatchError::new(
            "`host` is not a table of [host.\"<url>\"] entries; the agent edits only that form",
        )
    })
}

/// The host containerd tries first: the `[host."…"]` table written first.
/// `None` when the order cannot be told, because some host is not such a
/// table (an inline table, dotted keys): the caller then refuses.
fn first_host(doc: &DocumentMut) -> Option<String> {
    let hosts = doc.get("host")?.as_table()?;
    let mut order = Vec::new();
    for (k, h) in hosts.iter() {
        let t = h.as_table().filter(|t| !t.is_dotted())?;
        order.push((t.position()?, k.to_string()));
    }
    order.into_iter().min().map(|(_, k)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADMIN: &str = "# ours: the build farm's cache first\nserver = \"https://quay.io\"\n\n[host.\"https://cache.farm.example\"]\n  capabilities = [\"pull\"]\n  skip_verify = true\n  [host.\"https://cache.farm.example\".header]\n    x-farm = [\"1\"]\n";

    fn proxy() -> MirrorHost {
        MirrorHost {
            url: "https://10.0.0.5".into(),
            tls: HostTls {
                ca: Some("pullthrough-ca.crt".into()),
                ..HostTls::default()
            },
        }
    }

    #[test]
    fn an_admins_hosts_toml_gets_the_proxy_first_and_keeps_the_rest() {
        let merged = merge(ADMIN.as_bytes(), &proxy()).unwrap();
        let text = s(&merged);
        let ours = text.find("[host.\"https://10.0.0.5\"]").unwrap();
        let theirs = text.find("[host.\"https://cache.farm.example\"]").unwrap();
        assert!(ours < theirs, "{text}");
        for kept in [
            "# ours: the build farm's cache first",
            "server = \"https://quay.io\"",
            "  skip_verify = true",
            "    x-farm = [\"1\"]",
        ] {
            assert!(text.contains(kept), "{kept}: {text}");
        }
        assert_eq!(merge(&merged, &proxy()).unwrap(), merged, "idempotent");
        let back = unmerge(&merged, "https://10.0.0.5").unwrap();
        assert!(!s(&back).contains("10.0.0.5"), "{}", s(&back));
        assert!(s(&back).contains("cache.farm.example"));
        // Only a server: the proxy becomes its one host.
        let merged = merge(b"server = \"https://quay.io\"\n", &proxy()).unwrap();
        assert!(
            s(&merged).contains("[host.\"https://10.0.0.5\"]"),
            "{}",
            s(&merged)
        );
        assert!(merge(b"host = 1\n", &proxy()).is_err());
    }

    fn s(b: &[u8]) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    /// containerd orders hosts by the line that defines them, whatever
    /// the form: an inline table under `[host]`, dotted keys, a
    /// `host = {…}` value. The proxy still comes first, and the admin's
    /// hosts keep every setting.
    #[test]
    fn the_proxy_comes_first_whatever_form_the_admins_hosts_take() {
        for admin in [
            "server = \"https://quay.io\"\n[host]\n\"https://a\" = { capabilities = [\"pull\"], skip_verify = true }\n\"https://b\" = { capabilities = [\"pull\"] }\n",
            "server = \"https://quay.io\"\nhost.\"https://a\".capabilities = [\"pull\"]\nhost.\"https://a\".skip_verify = true\nhost.\"https://b\".capabilities = [\"pull\"]\n",
            "server = \"https://quay.io\"\nhost = { \"https://a\" = { capabilities = [\"pull\"], skip_verify = true }, \"https://b\" = { capabilities = [\"pull\"] } }\n",
            "server = \"https://quay.io\"\n[host]\n\"https://a\" = { capabilities = [\"pull\"], skip_verify = true }\n[host.\"https://b\"]\ncapabilities = [\"pull\"]\n",
        ] {
            let merged = merge(admin.as_bytes(), &proxy()).unwrap();
            let text = s(&merged);
            let at = |k: &str| text.find(k).unwrap_or_else(|| panic!("{k}: {text}"));
            assert!(
                at("https://10.0.0.5") < at("https://a"),
                "{admin}\n=>\n{text}"
            );
            assert!(at("https://a") < at("https://b"), "{admin}\n=>\n{text}");
            assert!(text.contains("\n[host.\"https://a\"]\n"), "{text}");
            let doc: DocumentMut = text.parse().unwrap();
            assert_eq!(
                doc["host"]["https://a"]["skip_verify"].as_bool(),
                Some(true),
                "{text}"
            );
            check_hosts_toml(&merged, "https://quay.io", 3).unwrap();
            assert_eq!(
                merge(&merged, &proxy()).unwrap(),
                merged,
                "idempotent: {text}"
            );
        }
    }

    #[test]
    fn hosts_toml_reads_back_as_containerd_expects() {
        let out = hosts_toml(
            "https://quay.io",
            &HostTls::default(),
            &[MirrorHost {
                url: "https://10.0.0.5".into(),
                tls: HostTls {
                    ca: Some("pullthrough-ca.crt".into()),
                    ..HostTls::default()
                },
            }],
        )
        .unwrap();
        assert_eq!(
            s(&out),
            format!(
                "{GENERATED_HEADER}\nserver = \"https://quay.io\"\n\n[host.\"https://10.0.0.5\"]\ncapabilities = [\"pull\", \"resolve\"]\nca = \"pullthrough-ca.crt\"\n"
            )
        );
        assert!(hosts_toml("https://quay.io", &HostTls::default(), &[]).is_err());
    }

    #[test]
    fn server_names() {
        assert_eq!(
            server_for("docker.io", None),
            "https://registry-1.docker.io"
        );
        assert_eq!(server_for("quay.io", None), "https://quay.io");
        assert_eq!(
            server_for("r.io", Some("http://r.io:5000/")),
            "http://r.io:5000"
        );
    }
}
