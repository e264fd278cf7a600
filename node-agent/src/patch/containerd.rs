//! containerd: `registry.config_path` in `/etc/containerd/config.toml`
//! (edited with `toml_edit`, so comments and layout stay) and the generated
//! `<config_path>/<host>/hosts.toml` files.
//!
//! - config `version = 2` (containerd 1.x):
//!   `[plugins."io.containerd.grpc.v1.cri".registry] config_path`
//! - config `version = 3` (containerd 2.x):
//!   `[plugins."io.containerd.cri.v1.images".registry] config_path`
//!
//! Setting `config_path` while the deprecated `registry.mirrors` (or
//! `registry.configs.<host>.tls`) is present stops the CRI plugin from
//! loading, so such a file is refused unless the caller asks to migrate:
//! then those tables move into hosts.toml files and leave config.toml.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use toml_edit::{Array, DocumentMut, Item, Table, TableLike, value};

use super::{GENERATED_HEADER, PatchError};

/// Where containerd's config lives.
pub const CONFIG_TOML: &str = "/etc/containerd/config.toml";
/// The `config_path` the agent sets when there is none.
pub const DEFAULT_CERTS_D: &str = "/etc/containerd/certs.d";

const CRI_V2: &str = "io.containerd.grpc.v1.cri";
const CRI_V3_IMAGES: &str = "io.containerd.cri.v1.images";

/// What config.toml says about registries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerdInfo {
    /// The file exists.
    pub exists: bool,
    /// `version` (None: absent).
    pub version: Option<i64>,
    /// `disabled_plugins` holds the CRI plugin (containerd under dockerd).
    pub cri_disabled: bool,
    /// Current `registry.config_path`, if set and non-empty.
    pub config_path: Option<String>,
    /// Deprecated `registry.mirrors` hosts.
    pub mirrors: Vec<String>,
    /// Hosts with a deprecated `registry.configs.<host>.tls`.
    pub tls_configs: Vec<String>,
}

impl ContainerdInfo {
    /// The directory hosts.toml files go in: the first entry of
    /// `config_path` (containerd 2.1+ transfer pulls read a colon list as
    /// one literal directory, so the agent never sets a list itself).
    pub fn hosts_dir(&self) -> Option<&str> {
        self.config_path
            .as_deref()
            .and_then(|p| p.split(':').find(|s| !s.is_empty()))
    }
}

/// What the agent changed in config.toml (kept in the state file).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigRecord {
    /// The `config_path` value the agent set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_config_path: Option<String>,
    /// The value `config_path` had before (an empty string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_config_path: Option<String>,
    /// Tables the agent created, as key paths.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub created_tables: Vec<Vec<String>>,
    /// The agent added `version = 2` (to an empty file).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub added_version: bool,
    /// `registry.mirrors` / `configs.*.tls` were moved into hosts.toml.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub migrated: bool,
}

/// One mirror endpoint from a migrated `registry.mirrors` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostTls {
    pub ca: Option<String>,
    pub client: Option<(String, String)>,
    pub skip_verify: Option<bool>,
}

/// A registry's deprecated settings, moved out of config.toml.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigratedRegistry {
    /// Mirror endpoint URLs, in order.
    pub endpoints: Vec<String>,
    /// TLS settings per `host[:port]` (from `registry.configs`).
    pub tls: BTreeMap<String, HostTls>,
}

/// Result of [`ensure_config_path`].
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigPatched {
    /// New content (unchanged bytes when nothing had to change).
    pub bytes: Vec<u8>,
    pub record: ConfigRecord,
    /// Directory for hosts.toml files.
    pub hosts_dir: String,
    /// `config_path` had to be enabled: containerd needs one restart.
    pub enabled: bool,
    /// Registries moved out of `registry.mirrors`, by registry name
    /// (`*` for the catch-all).
    pub migrated: BTreeMap<String, MigratedRegistry>,
}

fn parse(bytes: &[u8]) -> Result<DocumentMut, PatchError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| PatchError::new("is not UTF-8 text, so not TOML; fix it first"))?;
    text.parse::<DocumentMut>().map_err(|e| {
        PatchError::new(format!(
            "is not valid TOML ({}); containerd would not start with it. Fix it first; the file was left untouched",
            e.to_string().trim()
        ))
    })
}

/// Gives `output` (toml_edit's rendering, LF line ends, final newline)
/// the line ending and final-newline state of `input`, so an edit touches
/// only the lines it changes.
fn restyle(input: &[u8], output: String) -> Vec<u8> {
    let crlf = input
        .iter()
        .position(|&b| b == b'\n')
        .is_some_and(|i| i > 0 && input[i - 1] == b'\r');
    let mut out = if crlf {
        let mut o = String::with_capacity(output.len() + output.len() / 16);
        let mut prev = '\0';
        for c in output.chars() {
            if c == '\n' && prev != '\r' {
                o.push('\r');
            }
            o.push(c);
            prev = c;
        }
        o.into_bytes()
    } else {
        output.into_bytes()
    };
    if !input.is_empty() && !input.ends_with(b"\n") && out.ends_with(b"\n") {
        out.pop();
        if out.ends_with(b"\r") {
            out.pop();
        }
    }
    out
}

fn cri_name(version: i64) -> &'static str {
    if version >= 3 { CRI_V3_IMAGES } else { CRI_V2 }
}

fn registry_path(version: i64) -> [&'static str; 3] {
    ["plugins", cri_name(version), "registry"]
}

fn get_path<'a>(root: &'a dyn TableLike, path: &[&str]) -> Option<&'a Item> {
    let (first, rest) = path.split_first()?;
    let item = root.get(first)?;
    if rest.is_empty() {
        Some(item)
    } else {
        get_path(item.as_table_like()?, rest)
    }
}

fn keys_of(item: Option<&Item>) -> Vec<String> {
    item.and_then(Item::as_table_like)
        .map(|t| t.iter().map(|(k, _)| k.to_string()).collect())
        .unwrap_or_default()
}

fn inspect_doc(doc: &DocumentMut) -> Result<ContainerdInfo, PatchError> {
    let root = doc.as_table() as &dyn TableLike;
    let version = match root.get("version") {
        None => None,
        Some(v) => Some(
            v.as_integer()
                .ok_or_else(|| PatchError::new("`version` is not an integer"))?,
        ),
    };
    let cri_disabled = root
        .get("disabled_plugins")
        .and_then(Item::as_array)
        .is_some_and(|a| {
            a.iter()
                .any(|v| matches!(v.as_str(), Some("cri" | CRI_V2 | CRI_V3_IMAGES)))
        });
    let reg = get_path(root, &registry_path(version.unwrap_or(2)));
    let reg_table = reg.and_then(Item::as_table_like);
    let config_path = match reg_table.and_then(|t| t.get("config_path")) {
        None => None,
        Some(v) => Some(
            v.as_str()
                .ok_or_else(|| PatchError::new("`registry.config_path` is not a string"))?
                .to_string(),
        ),
    }
    .filter(|s| !s.is_empty());
    let mirrors = keys_of(reg_table.and_then(|t| t.get("mirrors")));
    let tls_configs = reg_table
        .and_then(|t| t.get("configs"))
        .and_then(Item::as_table_like)
        .map(|c| {
            c.iter()
                .filter(|(_, v)| v.as_table_like().is_some_and(|t| t.contains_key("tls")))
                .map(|(k, _)| k.to_string())
                .collect()
        })
        .unwrap_or_default();
    Ok(ContainerdInfo {
        exists: true,
        version,
        cri_disabled,
        config_path,
        mirrors,
        tls_configs,
    })
}

/// Reads what matters in config.toml (`None`: no file).
pub fn inspect(current: Option<&[u8]>) -> Result<ContainerdInfo, PatchError> {
    match current {
        None => Ok(ContainerdInfo {
            exists: false,
            version: None,
            cri_disabled: false,
            config_path: None,
            mirrors: Vec::new(),
            tls_configs: Vec::new(),
        }),
        Some(b) => inspect_doc(&parse(b)?),
    }
}

/// Makes sure `registry.config_path` is set, adding it (as
/// [`DEFAULT_CERTS_D`]) only when it is not. `prev` is the record of an
/// earlier apply, carried forward.
pub fn ensure_config_path(
    current: Option<&[u8]>,
    prev: &ConfigRecord,
    migrate: bool,
) -> Result<ConfigPatched, PatchError> {
    let Some(bytes) = current else {
        // No config.toml: containerd runs on defaults. A minimal version 2
        // file (containerd 2.x migrates it in memory) sets only config_path.
        let mut doc = DocumentMut::new();
        doc.insert("version", value(2));
        doc.decor_mut().set_prefix(format!("{GENERATED_HEADER}\n"));
        let mut created = Vec::new();
        set_config_path(&mut doc, 2, DEFAULT_CERTS_D, &mut created)?;
        let out = doc.to_string().into_bytes();
        check_config(&out, DEFAULT_CERTS_D)?;
        return Ok(ConfigPatched {
            bytes: out,
            record: ConfigRecord {
                set_config_path: Some(DEFAULT_CERTS_D.into()),
                created_tables: created,
                added_version: true,
                ..ConfigRecord::default()
            },
            hosts_dir: DEFAULT_CERTS_D.into(),
            enabled: true,
            migrated: BTreeMap::new(),
        });
    };
    let mut doc = parse(bytes)?;
    let info = inspect_doc(&doc)?;
    if info.cri_disabled {
        return Err(PatchError::new(
            "has the CRI plugin in `disabled_plugins`: this containerd serves dockerd, not Kubernetes, and is left alone",
        ));
    }
    let mut record = prev.clone();
    let mut added_version = false;
    let version = match info.version {
        Some(v @ (2 | 3)) => v,
        None if doc.as_table().is_empty() => {
            doc.insert("version", value(2));
            added_version = true;
            2
        }
        other => {
            return Err(PatchError::new(format!(
                "has config {} which the agent does not edit; migrate it with `containerd config migrate` (version 2 or 3) first",
                other.map_or(
                    "without `version` (version 1 format)".to_string(),
                    |v| format!("version {v}")
                )
            )));
        }
    };
    let has_deprecated = !info.mirrors.is_empty() || !info.tls_configs.is_empty();
    if has_deprecated && !migrate {
        return Err(PatchError::new(format!(
            "uses the deprecated `[plugins.\"{}\".registry.mirrors]`/`configs.<host>.tls` tables ({}); setting config_path next to them stops the CRI plugin from loading. Re-run with --migrate-containerd-mirrors to move them into hosts.toml files (the original is backed up)",
            cri_name(version),
            info.mirrors
                .iter()
                .chain(info.tls_configs.iter())
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    let mut migrated = BTreeMap::new();
    if has_deprecated {
        migrated = take_deprecated(&mut doc, version)?;
        record.migrated = true;
    }
    if let Some(dir) = info.hosts_dir() {
        if !has_deprecated {
            return Ok(ConfigPatched {
                bytes: bytes.to_vec(),
                record,
                hosts_dir: dir.to_string(),
                enabled: false,
                migrated,
            });
        }
        let dir = dir.to_string();
        let out = restyle(bytes, doc.to_string());
        check_config(&out, &dir)?;
        return Ok(ConfigPatched {
            bytes: out,
            record,
            hosts_dir: dir,
            enabled: true,
            migrated,
        });
    }
    let replaced = get_path(doc.as_table(), &registry_path(version)).and_then(|r| {
        r.as_table_like()?
            .get("config_path")?
            .as_str()
            .map(String::from)
    });
    let mut created = Vec::new();
    set_config_path(&mut doc, version, DEFAULT_CERTS_D, &mut created)?;
    record.set_config_path = Some(DEFAULT_CERTS_D.into());
    if record.replaced_config_path.is_none() {
        record.replaced_config_path = replaced;
    }
    record.created_tables.extend(created);
    record.added_version |= added_version;
    let out = restyle(bytes, doc.to_string());
    check_config(&out, DEFAULT_CERTS_D)?;
    Ok(ConfigPatched {
        bytes: out,
        record,
        hosts_dir: DEFAULT_CERTS_D.into(),
        enabled: true,
        migrated,
    })
}

fn set_config_path(
    doc: &mut DocumentMut,
    version: i64,
    dir: &str,
    created: &mut Vec<Vec<String>>,
) -> Result<(), PatchError> {
    let path = registry_path(version);
    let mut cur: &mut dyn TableLike = doc.as_table_mut();
    for (i, seg) in path.iter().enumerate() {
        if !cur.contains_key(seg) {
            let mut t = Table::new();
            // Only the registry table gets a header; its parents stay
            // implicit, so one `[plugins."…".registry]` line is added.
            t.set_implicit(i + 1 < path.len());
            cur.insert(seg, Item::Table(t));
            created.push(path[..=i].iter().map(|s| s.to_string()).collect());
        }
        cur = cur
            .get_mut(seg)
            .and_then(Item::as_table_like_mut)
            .ok_or_else(|| PatchError::new(format!("`{}` is not a table", path[..=i].join("."))))?;
    }
    cur.insert("config_path", value(dir));
    Ok(())
}

/// Removes `registry.mirrors` and `registry.configs.*.tls` and returns
/// them, per registry.
fn take_deprecated(
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

/// `host[:port]` of a URL (or of a bare `host[:port]`).
pub fn authority(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.split('/').next().unwrap_or(rest)
}

/// Parse-back check of config.toml: valid TOML, `config_path` as intended,
/// no deprecated tables left next to it.
fn check_config(bytes: &[u8], dir: &str) -> Result<(), PatchError> {
    let info = inspect(Some(bytes))?;
    if info.hosts_dir() != Some(dir) || !info.mirrors.is_empty() || !info.tls_configs.is_empty() {
        return Err(PatchError::new(format!(
            "internal error: the edited config.toml does not read back as intended ({info:?})"
        )));
    }
    Ok(())
}

/// Removes what `record` says the agent added. `delete_if_empty`: the agent
/// created the file, and if nothing else is left in it, it goes (`None`).
/// Migrated tables cannot be put back from the record; the first-edit
/// backup holds them (see the notes).
pub fn revert_config(
    current: &[u8],
    record: &ConfigRecord,
    delete_if_empty: bool,
) -> Result<(Option<Vec<u8>>, Vec<String>), PatchError> {
    let mut doc = parse(current)?;
    let mut notes = Vec::new();
    let version = inspect_doc(&doc)?.version.unwrap_or(2);
    if let Some(set) = &record.set_config_path {
        let path = registry_path(version);
        let mut cur: Option<&mut dyn TableLike> = Some(doc.as_table_mut());
        for seg in path {
            cur = cur
                .and_then(|t| t.get_mut(seg))
                .and_then(Item::as_table_like_mut);
        }
        if let Some(reg) = cur {
            if reg.get("config_path").and_then(Item::as_str) == Some(set) {
                match &record.replaced_config_path {
                    Some(old) => {
                        reg.insert("config_path", value(old.as_str()));
                    }
                    None => {
                        reg.remove("config_path");
                    }
                }
            } else {
                notes.push(format!(
                    "config_path no longer is {set}: left as the admin changed it"
                ));
            }
        }
    }
    let mut created = record.created_tables.clone();
    created.sort_by_key(|p| std::cmp::Reverse(p.len()));
    for path in created {
        let Some((last, parents)) = path.split_last() else {
            continue;
        };
        let mut cur: Option<&mut dyn TableLike> = Some(doc.as_table_mut());
        for seg in parents {
            cur = cur
                .and_then(|t| t.get_mut(seg))
                .and_then(Item::as_table_like_mut);
        }
        if let Some(parent) = cur
            && parent
                .get(last)
                .and_then(Item::as_table_like)
                .is_some_and(|t| t.is_empty())
        {
            parent.remove(last);
        }
    }
    if record.added_version {
        doc.remove("version");
    }
    if record.migrated {
        notes.push(
            "the deprecated registry.mirrors/configs tables were migrated to hosts.toml; the first-edit backup holds them".into(),
        );
    }
    if delete_if_empty && doc.as_table().is_empty() {
        return Ok((None, notes));
    }
    let out = restyle(current, doc.to_string());
    parse(&out)?;
    Ok((Some(out), notes))
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
        let mut t = Table::new();
        let mut caps = Array::new();
        caps.push("pull");
        caps.push("resolve");
        t.insert("capabilities", value(caps));
        put_tls(&mut t, &h.tls);
        host_table.insert(&h.url, Item::Table(t));
    }
    doc.insert("host", Item::Table(host_table));
    let out = doc.to_string().into_bytes();
    check_hosts_toml(&out, server, hosts.len())?;
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const V2: &str = r#"# my containerd config
version = 2
root = "/var/lib/containerd"   # keep me

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.9"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
"#;

    fn s(b: &[u8]) -> &str {
        std::str::from_utf8(b).unwrap()
    }

    #[test]
    fn version_2_gets_config_path_and_keeps_everything_else() {
        let p = ensure_config_path(Some(V2.as_bytes()), &ConfigRecord::default(), false).unwrap();
        let out = s(&p.bytes);
        assert!(out.starts_with(V2), "{out}");
        assert!(
            out.contains("[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\""),
            "{out}"
        );
        assert!(p.enabled);
        assert_eq!(p.hosts_dir, DEFAULT_CERTS_D);
        // Second apply: already set, nothing to do.
        let q = ensure_config_path(Some(&p.bytes), &p.record, false).unwrap();
        assert_eq!(q.bytes, p.bytes);
        assert!(!q.enabled);
        let (back, _) = revert_config(&p.bytes, &p.record, false).unwrap();
        assert_eq!(s(&back.unwrap()), V2);
    }

    #[test]
    fn version_3_uses_the_images_plugin() {
        let v3 =
            "version = 3\n\n[plugins.'io.containerd.cri.v1.images']\n  snapshotter = 'overlayfs'\n";
        let p = ensure_config_path(Some(v3.as_bytes()), &ConfigRecord::default(), false).unwrap();
        let info = inspect(Some(&p.bytes)).unwrap();
        assert_eq!(info.config_path.as_deref(), Some(DEFAULT_CERTS_D));
        assert!(s(&p.bytes).contains("io.containerd.cri.v1.images"));
        assert!(!s(&p.bytes).contains(CRI_V2));
        let (back, _) = revert_config(&p.bytes, &p.record, false).unwrap();
        assert_eq!(s(&back.unwrap()), v3);
    }

    #[test]
    fn an_existing_config_path_is_used_as_is() {
        let t = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d:/etc/docker/certs.d\"\n";
        let p = ensure_config_path(Some(t.as_bytes()), &ConfigRecord::default(), false).unwrap();
        assert_eq!(p.bytes, t.as_bytes());
        assert!(!p.enabled);
        assert_eq!(p.hosts_dir, "/etc/containerd/certs.d");
    }

    #[test]
    fn a_missing_file_is_created_minimal_and_removed_on_revert() {
        let p = ensure_config_path(None, &ConfigRecord::default(), false).unwrap();
        let out = s(&p.bytes);
        assert!(out.starts_with(GENERATED_HEADER), "{out}");
        assert_eq!(inspect(Some(&p.bytes)).unwrap().version, Some(2));
        assert!(p.enabled);
        let (back, _) = revert_config(&p.bytes, &p.record, true).unwrap();
        assert_eq!(back, None);
    }

    #[test]
    fn deprecated_mirrors_are_refused_unless_migrating() {
        let t = r#"version = 2
[plugins."io.containerd.grpc.v1.cri".registry]
  [plugins."io.containerd.grpc.v1.cri".registry.mirrors]
    [plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]
      endpoint = ["https://mirror.example", "https://registry-1.docker.io"]
  [plugins."io.containerd.grpc.v1.cri".registry.configs]
    [plugins."io.containerd.grpc.v1.cri".registry.configs."mirror.example".tls]
      ca_file = "/etc/ssl/mirror.pem"
    [plugins."io.containerd.grpc.v1.cri".registry.configs."mirror.example".auth]
      username = "u"
"#;
        let e =
            ensure_config_path(Some(t.as_bytes()), &ConfigRecord::default(), false).unwrap_err();
        assert!(e.0.contains("--migrate-containerd-mirrors"), "{e}");
        assert!(e.0.contains("docker.io"), "{e}");

        let p = ensure_config_path(Some(t.as_bytes()), &ConfigRecord::default(), true).unwrap();
        let out = s(&p.bytes);
        assert!(!out.contains("mirrors"), "{out}");
        assert!(!out.contains("ca_file"), "{out}");
        assert!(out.contains("username = \"u\""), "{out}");
        assert!(p.record.migrated);
        let m = &p.migrated["docker.io"];
        assert_eq!(m.endpoints[0], "https://mirror.example");
        assert_eq!(
            m.tls["mirror.example"].ca.as_deref(),
            Some("/etc/ssl/mirror.pem")
        );
    }

    #[test]
    fn refuses_cri_disabled_and_version_1() {
        let e = ensure_config_path(
            Some(b"disabled_plugins = [\"cri\"]\n"),
            &ConfigRecord::default(),
            false,
        )
        .unwrap_err();
        assert!(e.0.contains("disabled_plugins"), "{e}");
        let e = ensure_config_path(Some(b"[plugins.cri]\n"), &ConfigRecord::default(), false)
            .unwrap_err();
        assert!(e.0.contains("version 1"), "{e}");
        let e = ensure_config_path(
            Some(b"version = 2\n[plugins\n"),
            &ConfigRecord::default(),
            false,
        )
        .unwrap_err();
        assert!(e.0.contains("not valid TOML"), "{e}");
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
        assert_eq!(authority("https://m.example:5000/v2"), "m.example:5000");
    }

    /// Foreign config.toml documents: comments, odd spacing, other tables,
    /// dotted keys, CRLF, no final newline; version 2 or 3.
    fn foreign_config() -> impl Strategy<Value = String> {
        let item = prop_oneof![
            "[a-z_]{1,8}".prop_map(|k| format!("{k} = \"v\"  # note")),
            "[a-z_]{1,8}".prop_map(|k| format!(
                "[ {k} ]   # spaced header\n{k}_x   =   {{ a = 1,  b = 'x' }}\n{k}_y = [\n  1,\n  2, # two\n]\t"
            )),
            "[a-z_]{1,8}".prop_map(|k| format!("[[{k}]]\nname = '''lit'''")),
            "[a-z_]{1,8}".prop_map(|k| format!("[{k}]\n  x = 1\n\t y = [1, 2]")),
            Just("[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"".to_string()),
            Just("[plugins.'io.containerd.cri.v1.images']\n  snapshotter = 'overlayfs'".to_string()),
            Just("[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"pause\"".to_string()),
            Just("# a comment\n\n".to_string()),
        ];
        (
            2..4i64,
            prop::collection::vec(item, 0..5),
            prop::bool::ANY,
            prop::bool::ANY,
        )
            .prop_map(|(v, items, crlf, final_nl)| {
                let mut seen = std::collections::HashSet::new();
                let body: Vec<String> = items
                    .into_iter()
                    .filter(|i| seen.insert(i.clone()))
                    .collect();
                let mut t = format!("version = {v}\n{}", body.join("\n"));
                if final_nl {
                    t.push('\n')
                }
                if crlf {
                    t = t.replace('\n', "\r\n")
                }
                t
            })
    }

    proptest! {
        #[test]
        fn config_toml_foreign_content_survives_and_revert_is_exact(orig in foreign_config()) {
            prop_assume!(orig.parse::<DocumentMut>().is_ok());
            let p = ensure_config_path(Some(orig.as_bytes()), &ConfigRecord::default(), false).unwrap();
            // Everything the admin wrote is still there, in order.
            let out = s(&p.bytes).to_string();
            for line in orig.lines() {
                prop_assert!(out.contains(line), "lost {:?} in {}", line, out);
            }
            let again = ensure_config_path(Some(&p.bytes), &p.record, false).unwrap();
            prop_assert_eq!(&again.bytes, &p.bytes);
            let (back, _) = revert_config(&p.bytes, &p.record, false).unwrap();
            let back = back.unwrap();
            prop_assert_eq!(s(&back), orig.as_str());
        }
    }
}
