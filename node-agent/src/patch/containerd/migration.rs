//! `--migrate-containerd-mirrors`: the deprecated `registry.mirrors` and
//! `registry.configs.<host>.tls` tables taken out of config.toml (they
//! stop the CRI plugin from loading next to `config_path`) and put back
//! on revert.

use std::collections::BTreeMap;

use toml_edit::{DocumentMut, Item, Table, TableLike, value};

use super::super::hosts_toml::HostTls;
use super::{MigratedRegistry, PatchError, authority, get_path, registry_path};

/// Removes `registry.mirrors` and `registry.configs.*.tls` and returns
/// them, per registry.
pub(super) fn take_deprecated(
    doc: &mut DocumentMut,
    version: i64,
) -> Result<BTreeMap<String, MigratedRegistry>, PatchError> {
    let path = registry_path(version);
    let mut out: BTreeMap<String, MigratedRegistry> = BTreeMap::new();
    let mut cur: &mut dyn TableLike = doc.as_table_mut();
    for seg in path {
        cur = cur
            .get_mut(seg)
            .and_then(Item::as_table_like_mut)
            .ok_or_else(|| PatchError::new("registry table vanished"))?;
    }
    let reg = cur;
    refuse_uncarried(&*reg)?;
    if let Some(mirrors) = reg.remove("mirrors") {
        let mirrors = mirrors
            .as_table_like()
            .ok_or_else(|| PatchError::new("`registry.mirrors` is not a table"))?;
        for (host, m) in mirrors.iter() {
            let endpoints = m
                .as_table_like()
                .and_then(|t| t.get("endpoint"))
                .and_then(Item::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default();
            out.entry(host.to_string()).or_default().endpoints = endpoints;
        }
    }
    let mut tls_by_host: BTreeMap<String, HostTls> = BTreeMap::new();
    if let Some(configs) = reg.get_mut("configs").and_then(Item::as_table_like_mut) {
        let hosts: Vec<String> = configs.iter().map(|(k, _)| k.to_string()).collect();
        for host in hosts {
            let Some(entry) = configs.get_mut(&host).and_then(Item::as_table_like_mut) else {
                continue;
            };
            if let Some(tls) = entry.remove("tls") {
                let t = tls.as_table_like();
                let s = |k: &str| {
                    t.and_then(|t| t.get(k))
                        .and_then(Item::as_str)
                        .filter(|s| !s.is_empty())
                        .map(String::from)
                };
                let client = match (s("cert_file"), s("key_file")) {
                    (Some(c), Some(k)) => Some((c, k)),
                    _ => None,
                };
                tls_by_host.insert(
                    host.clone(),
                    HostTls {
                        ca: s("ca_file"),
                        client,
                        skip_verify: t
                            .and_then(|t| t.get("insecure_skip_verify"))
                            .and_then(Item::as_bool),
                    },
                );
            }
            if entry.is_empty() {
                configs.remove(&host);
            }
        }
        if configs.is_empty() {
            reg.remove("configs");
        }
    }
    // TLS settings follow the host they were keyed by: a registry's own
    // name, or one of the mirror endpoints.
    for (host, tls) in tls_by_host {
        let owner = out
            .iter()
            .find(|(_, m)| m.endpoints.iter().any(|e| authority(e) == host))
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| host.clone());
        out.entry(owner).or_default().tls.insert(host, tls);
    }
    Ok(out)
}

/// What a hosts.toml file can hold of a deprecated mirror and TLS table.
const MIRROR_KEYS: &[&str] = &["endpoint"];
const TLS_KEYS: &[&str] = &["ca_file", "cert_file", "key_file", "insecure_skip_verify"];

/// Refuses a mirror or TLS table with a setting the migration would not
/// carry into hosts.toml (containerd 1.7's `rewrite`, say): moved out, it
/// would change how the node pulls, and a revert could not give it back.
/// Checked before anything is removed, so a refusal leaves the file as is.
fn refuse_uncarried(reg: &dyn TableLike) -> Result<(), PatchError> {
    let tables = |name: &str, sub: Option<&str>| -> Vec<(String, &dyn TableLike)> {
        let Some(outer) = reg.get(name).and_then(Item::as_table_like) else {
            return Vec::new();
        };
        outer
            .iter()
            .filter_map(|(host, item)| {
                let t = item.as_table_like()?;
                match sub {
                    None => Some((host.to_string(), t)),
                    Some(sub) => Some((host.to_string(), t.get(sub)?.as_table_like()?)),
                }
            })
            .collect()
    };
    let checks = [
        ("mirrors", None, MIRROR_KEYS),
        ("configs", Some("tls"), TLS_KEYS),
    ];
    for (name, sub, known) in checks {
        for (host, t) in tables(name, sub) {
            if let Some((key, _)) = t.iter().find(|(k, _)| !known.contains(k)) {
                let at = match sub {
                    None => format!("registry.{name}.\"{host}\".{key}"),
                    Some(sub) => format!("registry.{name}.\"{host}\".{sub}.{key}"),
                };
                return Err(PatchError::new(format!(
                    "`{at}` cannot be carried into a hosts.toml file by --migrate-containerd-mirrors (it knows {}): move that registry's settings into hosts.toml yourself, or drop the key; config.toml was left as it is",
                    known.join(", ")
                )));
            }
        }
    }
    Ok(())
}

/// Puts the `registry.mirrors` and `configs.<host>.tls` tables
/// [`take_deprecated`] moved out back into config.toml. What the admin
/// wrote there since (a mirror or TLS table of the same name) wins. While
/// a `config_path` is still set (the admin's own) they cannot go back:
/// next to it they would stop the CRI plugin from loading, so they are
/// named in a note, as TOML to paste, instead of vanishing silently.
pub(super) fn put_back_migrated(
    doc: &mut DocumentMut,
    version: i64,
    moved: &BTreeMap<String, MigratedRegistry>,
    notes: &mut Vec<String>,
) -> Result<(), PatchError> {
    let path = registry_path(version);
    let mirrors: Vec<(&String, &Vec<String>)> = moved
        .iter()
        .filter(|(_, m)| !m.endpoints.is_empty())
        .map(|(name, m)| (name, &m.endpoints))
        .collect();
    let tls: Vec<(&String, &HostTls)> = moved.values().flat_map(|m| m.tls.iter()).collect();
    if mirrors.is_empty() && tls.is_empty() {
        return Ok(());
    }
    let mut staged = DocumentMut::new();
    {
        let reg = ensure_tables(staged.as_table_mut(), &path)?;
        for (name, endpoints) in &mirrors {
            let mut t = Table::new();
            t.insert(
                "endpoint",
                value(endpoints.iter().collect::<toml_edit::Array>()),
            );
            ensure_tables(reg, &["mirrors"])?.insert(name, Item::Table(t));
        }
        for (host, tls) in &tls {
            ensure_tables(reg, &["configs", host])?.insert("tls", Item::Table(tls_table(tls)));
        }
    }
    let still_set = get_path(doc.as_table(), &path)
        .and_then(Item::as_table_like)
        .and_then(|r| r.get("config_path"))
        .and_then(Item::as_str)
        .is_some_and(|p| !p.is_empty());
    if still_set {
        notes.push(format!(
            "config_path is still set, so the registry mirrors moved out by --migrate-containerd-mirrors were not put back (next to it they stop the CRI plugin); their settings were:\n{}",
            staged.to_string().trim_end()
        ));
        return Ok(());
    }
    let reg = ensure_tables(doc.as_table_mut(), &path)?;
    for (name, endpoints) in mirrors {
        let ours = ensure_tables(reg, &["mirrors"])?;
        if ours.contains_key(name) {
            notes.push(format!(
                "registry.mirrors.\"{name}\" was written again since the migration: kept as it is now"
            ));
            continue;
        }
        let mut t = Table::new();
        t.insert(
            "endpoint",
            value(endpoints.iter().collect::<toml_edit::Array>()),
        );
        ours.insert(name, Item::Table(t));
    }
    for (host, t) in tls {
        let entry = ensure_tables(reg, &["configs", host])?;
        if entry.contains_key("tls") {
            notes.push(format!(
                "registry.configs.\"{host}\".tls was written again since the migration: kept as it is now"
            ));
            continue;
        }
        entry.insert("tls", Item::Table(tls_table(t)));
    }
    notes.push(
        "the registry mirrors moved out by --migrate-containerd-mirrors are back in config.toml"
            .into(),
    );
    Ok(())
}

/// The table at `path` under `t`, with implicit tables created on the way
/// (so only tables holding keys get a header).
fn ensure_tables<'a>(
    t: &'a mut dyn TableLike,
    path: &[&str],
) -> Result<&'a mut dyn TableLike, PatchError> {
    let mut cur = t;
    for (i, seg) in path.iter().enumerate() {
        if !cur.contains_key(seg) {
            let mut n = Table::new();
            n.set_implicit(true);
            cur.insert(seg, Item::Table(n));
        }
        cur = cur
            .get_mut(seg)
            .and_then(Item::as_table_like_mut)
            .ok_or_else(|| PatchError::new(format!("`{}` is not a table", path[..=i].join("."))))?;
    }
    Ok(cur)
}

/// A `registry.configs.<host>.tls` table, as containerd's CRI plugin
/// spells it.
fn tls_table(tls: &HostTls) -> Table {
    let mut t = Table::new();
    if let Some(ca) = &tls.ca {
        t.insert("ca_file", value(ca.as_str()));
    }
    if let Some((cert, key)) = &tls.client {
        t.insert("cert_file", value(cert.as_str()));
        t.insert("key_file", value(key.as_str()));
    }
    if let Some(skip) = tls.skip_verify {
        t.insert("insecure_skip_verify", value(skip));
    }
    t
}
