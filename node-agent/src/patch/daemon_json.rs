//! `/etc/docker/daemon.json`: adds the proxy to `registry-mirrors` (and, in
//! plain-HTTP mode, `insecure-registries`) and records exactly which values
//! it added, so [`revert`] removes only those. Every other key keeps its
//! value and its place (serde_json with `preserve_order`). The file is
//! rewritten only when a value really changes; then it is printed in the
//! original's style (indent, final newline, or one line if it was one line).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::PatchError;

pub const REGISTRY_MIRRORS: &str = "registry-mirrors";
pub const INSECURE_REGISTRIES: &str = "insecure-registries";
pub const LIVE_RESTORE: &str = "live-restore";

/// dockerd's command-line flag for each managed key. dockerd refuses to
/// start (and ignores a SIGHUP) when a key is set both ways, whatever the
/// values (`the following directives are specified both as a flag and in
/// the configuration file`), so the agent must not write a key whose flag
/// dockerd runs with.
pub const DOCKERD_FLAGS: [(&str, &str); 2] = [
    ("--registry-mirror", REGISTRY_MIRRORS),
    ("--insecure-registry", INSECURE_REGISTRIES),
];

/// The values the proxy needs in each managed key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonJsonWant {
    /// Docker Hub mirror URLs (`https://10.0.0.5`), tried before the
    /// admin's own mirrors.
    pub registry_mirrors: Vec<String>,
    /// Plain-HTTP registries (only in plain-HTTP mode).
    pub insecure_registries: Vec<String>,
}

impl DaemonJsonWant {
    /// The values wanted in a managed key.
    pub fn for_key(&self, key: &str) -> &[String] {
        match key {
            REGISTRY_MIRRORS => &self.registry_mirrors,
            _ => &self.insecure_registries,
        }
    }
}

/// What the agent added to one key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AddedKey {
    /// The key did not exist before the agent added it.
    pub created: bool,
    /// Values the agent put in the array (not those the admin had).
    pub values: Vec<String>,
}

/// Per managed key, what the agent added (kept in the state file).
pub type Added = BTreeMap<String, AddedKey>;

/// Result of a patch.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonJsonPatched {
    /// New content; `None`: the file should not exist.
    pub bytes: Option<Vec<u8>>,
    /// The record to keep for the next apply / revert.
    pub added: Added,
    /// Keys whose value changed (decides reload vs restart).
    pub changed_keys: BTreeSet<String>,
}

const MANAGED: [&str; 2] = [REGISTRY_MIRRORS, INSECURE_REGISTRIES];

/// Parses daemon.json: a JSON object (an empty or blank file counts as
/// `{}`).
pub fn parse(bytes: &[u8]) -> Result<Map<String, Value>, PatchError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(PatchError::new(
            "is not a JSON object; dockerd would not start with it. Fix it first",
        )),
        Err(e) => Err(PatchError::new(format!(
            "is not valid JSON ({e}); dockerd would not start with it. Fix it first; the file was left untouched"
        ))),
    }
}

fn string_array(map: &Map<String, Value>, key: &str) -> Result<Option<Vec<String>>, PatchError> {
    match map.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                other => Err(PatchError::new(format!(
                    "`{key}` holds {other}, not a string; fix it first"
                ))),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(other) => Err(PatchError::new(format!(
            "`{key}` is {other}, not an array of strings; fix it first"
        ))),
    }
}

/// Sets the managed keys to hold `want` (besides the admin's values),
/// removing values an earlier apply added (`prev`) that are no longer
/// wanted. With an empty `want` this is the inverse of an apply.
pub fn apply(
    current: Option<&[u8]>,
    want: &DaemonJsonWant,
    prev: &Added,
) -> Result<DaemonJsonPatched, PatchError> {
    let mut map = match current {
        Some(b) => parse(b)?,
        None => Map::new(),
    };
    let original = map.clone();
    let mut added = Added::new();
    let mut changed_keys = BTreeSet::new();
    for key in MANAGED {
        let wanted = want.for_key(key);
        let before = string_array(&map, key)?;
        let prev_key = prev.get(key).cloned().unwrap_or_default();
        let had = before.clone().unwrap_or_default();
        let kept: Vec<String> = had
            .iter()
            .filter(|v| !prev_key.values.contains(v) || wanted.contains(v))
            .cloned()
            .collect();
        let missing: Vec<String> = wanted
            .iter()
            .filter(|w| !kept.contains(w))
            .cloned()
            .collect();
        let new: Vec<String> = if key == REGISTRY_MIRRORS {
            missing.iter().chain(kept.iter()).cloned().collect()
        } else {
            kept.iter().chain(missing.iter()).cloned().collect()
        };
        let ours: Vec<String> = wanted
            .iter()
            .filter(|w| prev_key.values.contains(w) || !had.contains(w))
            .cloned()
            .collect();
        let created = before.is_none() || prev_key.created;
        let drop_key = new.is_empty() && created;
        if drop_key {
            if map.shift_remove(key).is_some() {
                changed_keys.insert(key.to_string());
            }
        } else if before.as_ref() != Some(&new) {
            let value = Value::Array(new.into_iter().map(Value::String).collect());
            match map.get_mut(key) {
                Some(slot) => *slot = value,
                None => {
                    map.insert(key.to_string(), value);
                }
            }
            changed_keys.insert(key.to_string());
        }
        if !ours.is_empty() {
            added.insert(
                key.to_string(),
                AddedKey {
                    created,
                    values: ours,
                },
            );
        }
    }
    if changed_keys.is_empty() {
        return Ok(DaemonJsonPatched {
            bytes: current.map(<[u8]>::to_vec),
            added,
            changed_keys,
        });
    }
    debug_assert_ne!(map, original);
    let bytes = render(&map, current)?;
    // Parse-back check: dockerd must be able to read what we write.
    if parse(&bytes)? != map {
        return Err(PatchError::new(
            "internal error: the rendered JSON does not parse back to the same value",
        ));
    }
    Ok(DaemonJsonPatched {
        bytes: Some(bytes),
        added,
        changed_keys,
    })
}

/// Removes what `prev` records as added. `delete_if_empty`: the file did
/// not exist before the agent; if nothing else is left in it, it goes.
pub fn revert(
    current: Option<&[u8]>,
    prev: &Added,
    delete_if_empty: bool,
) -> Result<DaemonJsonPatched, PatchError> {
    let mut p = apply(current, &DaemonJsonWant::default(), prev)?;
    if delete_if_empty
        && let Some(b) = &p.bytes
        && parse(b)?.is_empty()
    {
        p.bytes = None;
    }
    Ok(p)
}

/// `live-restore` as set in the file (`false` when absent).
pub fn live_restore(current: Option<&[u8]>) -> bool {
    current
        .and_then(|b| parse(b).ok())
        .and_then(|m| m.get(LIVE_RESTORE).and_then(Value::as_bool))
        .unwrap_or(false)
}

/// Prints the map in the style of `like`: same indent, same final newline;
/// one line if the original was one line.
fn render(map: &Map<String, Value>, like: Option<&[u8]>) -> Result<Vec<u8>, PatchError> {
    let like = like.unwrap_or(b"");
    let text = String::from_utf8_lossy(like);
    let body = text.trim_end();
    let one_line = !body.is_empty() && !body.contains('\n');
    let final_newline = like.is_empty() || like.ends_with(b"\n") || body.is_empty();
    let value = Value::Object(map.clone());
    let mut out = if one_line {
        serde_json::to_vec(&value)
    } else {
        let indent = body
            .lines()
            .skip(1)
            .map(|l| &l[..l.len() - l.trim_start().len()])
            .find(|ws| !ws.is_empty())
            .unwrap_or("  ")
            .to_string();
        let mut buf = Vec::new();
        let fmt = serde_json::ser::PrettyFormatter::with_indent(indent.as_bytes());
        let mut ser = serde_json::Serializer::with_formatter(&mut buf, fmt);
        value.serialize(&mut ser).map(|()| buf)
    }
    .map_err(|e| PatchError::new(format!("cannot print JSON: {e}")))?;
    if final_newline {
        if text.contains("\r\n") {
            out.extend_from_slice(b"\r\n");
        } else {
            out.push(b'\n');
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn want() -> DaemonJsonWant {
        DaemonJsonWant {
            registry_mirrors: vec!["https://10.0.0.5".into()],
            insecure_registries: vec![],
        }
    }

    fn value(b: &[u8]) -> Value {
        serde_json::from_slice(b).unwrap()
    }

    #[test]
    fn adds_the_mirror_first_and_keeps_every_other_key_in_order() {
        let orig = br#"{
    "log-driver": "json-file",
    "registry-mirrors": ["https://mine.example"],
    "log-opts": {"max-size": "10m", "a": 1},
    "debug": true
}
"#;
        let p = apply(Some(orig), &want(), &Added::new()).unwrap();
        let text = String::from_utf8(p.bytes.clone().unwrap()).unwrap();
        let keys: Vec<_> = value(text.as_bytes())
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        assert_eq!(
            keys,
            ["log-driver", "registry-mirrors", "log-opts", "debug"]
        );
        assert_eq!(
            value(text.as_bytes())["registry-mirrors"],
            serde_json::json!(["https://10.0.0.5", "https://mine.example"])
        );
        // Nested order kept too; the 4-space indent is reused.
        assert!(
            text.contains("\"max-size\": \"10m\",\n        \"a\": 1"),
            "{text}"
        );
        assert_eq!(
            p.changed_keys,
            BTreeSet::from([REGISTRY_MIRRORS.to_string()])
        );
        assert!(!p.added[REGISTRY_MIRRORS].created);

        // Second apply: nothing changes, the bytes are returned as they are.
        let again = apply(p.bytes.as_deref(), &want(), &p.added).unwrap();
        assert_eq!(again.bytes, p.bytes);
        assert!(again.changed_keys.is_empty());

        // Revert leaves the admin's mirror, in an equal document.
        let r = revert(p.bytes.as_deref(), &p.added, false).unwrap();
        assert_eq!(value(&r.bytes.unwrap()), value(orig));
    }

    #[test]
    fn created_keys_and_files_go_away_on_revert() {
        let p = apply(None, &want(), &Added::new()).unwrap();
        assert_eq!(
            String::from_utf8(p.bytes.clone().unwrap()).unwrap(),
            "{\n  \"registry-mirrors\": [\n    \"https://10.0.0.5\"\n  ]\n}\n"
        );
        let r = revert(p.bytes.as_deref(), &p.added, true).unwrap();
        assert_eq!(r.bytes, None);
        assert_eq!(
            r.changed_keys,
            BTreeSet::from([REGISTRY_MIRRORS.to_string()])
        );

        let p = apply(Some(b"{\"debug\":true}"), &want(), &Added::new()).unwrap();
        assert_eq!(
            p.bytes.as_deref().unwrap(),
            br#"{"debug":true,"registry-mirrors":["https://10.0.0.5"]}"#
        );
        let r = revert(p.bytes.as_deref(), &p.added, false).unwrap();
        assert_eq!(r.bytes.as_deref().unwrap(), br#"{"debug":true}"#);
    }

    #[test]
    fn a_value_the_admin_had_is_not_claimed() {
        let orig = br#"{"registry-mirrors": ["https://10.0.0.5"]}"#;
        let p = apply(Some(orig), &want(), &Added::new()).unwrap();
        assert_eq!(p.bytes.as_deref(), Some(&orig[..]));
        assert!(p.added.is_empty());
    }

    #[test]
    fn a_changed_proxy_replaces_the_old_value() {
        let p = apply(None, &want(), &Added::new()).unwrap();
        let w2 = DaemonJsonWant {
            registry_mirrors: vec!["https://10.0.0.9".into()],
            insecure_registries: vec!["10.0.0.9:80".into()],
        };
        let q = apply(p.bytes.as_deref(), &w2, &p.added).unwrap();
        let v = value(q.bytes.as_deref().unwrap());
        assert_eq!(
            v["registry-mirrors"],
            serde_json::json!(["https://10.0.0.9"])
        );
        assert_eq!(v["insecure-registries"], serde_json::json!(["10.0.0.9:80"]));
        assert_eq!(q.changed_keys.len(), 2);
    }

    #[test]
    fn malformed_files_are_refused() {
        for bad in [
            &b"{\"a\": 1,}"[..],
            b"[1]",
            b"{\"registry-mirrors\": \"https://x\"}",
            b"{\"registry-mirrors\": [1]}",
            b"\xef\xbb\xbf{}",
        ] {
            let e = apply(Some(bad), &want(), &Added::new()).unwrap_err();
            assert!(
                e.0.contains("fix it first") || e.0.contains("Fix it first"),
                "{e}"
            );
            assert!(revert(Some(bad), &Added::new(), false).is_err());
        }
    }

    #[test]
    fn live_restore_is_read() {
        assert!(live_restore(Some(b"{\"live-restore\": true}")));
        assert!(!live_restore(Some(b"{}")));
        assert!(!live_restore(None));
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i32>().prop_map(Value::from),
            "[ -~]{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(2, 8, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
                prop::collection::vec(("[a-z-]{1,6}", inner), 0..3)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    fn daemon_json() -> impl Strategy<Value = (Vec<u8>, Map<String, Value>)> {
        (
            prop::collection::vec(("[a-z-]{1,12}", json_value()), 0..6),
            prop::option::of(prop::collection::vec("https://[a-z]{1,5}", 0..3)),
            0..3usize,
        )
            .prop_map(|(kv, mirrors, style)| {
                let mut m: Map<String, Value> = kv
                    .into_iter()
                    .filter(|(k, _)| !MANAGED.contains(&k.as_str()))
                    .collect();
                if let Some(ms) = mirrors {
                    m.insert(REGISTRY_MIRRORS.into(), serde_json::json!(ms));
                }
                let v = Value::Object(m.clone());
                let bytes = match style {
                    0 => serde_json::to_vec(&v).unwrap(),
                    1 => serde_json::to_vec_pretty(&v).unwrap(),
                    _ => {
                        let mut b = serde_json::to_vec_pretty(&v).unwrap();
                        b.push(b'\n');
                        b
                    }
                };
                (bytes, m)
            })
    }

    proptest! {
        #[test]
        fn other_keys_survive_and_revert_restores_the_document(
            (orig, map) in daemon_json(),
            insecure in prop::bool::ANY,
        ) {
            let mut w = want();
            if insecure { w.insecure_registries = vec!["10.0.0.5:80".into()]; }
            let once = apply(Some(&orig), &w, &Added::new()).unwrap();
            let new = parse(once.bytes.as_deref().unwrap()).unwrap();
            // Every foreign key keeps its value and relative order.
            let foreign: Vec<_> = new.iter().filter(|(k, _)| !MANAGED.contains(&k.as_str())).collect();
            let orig_foreign: Vec<_> = map.iter().filter(|(k, _)| !MANAGED.contains(&k.as_str())).collect();
            prop_assert_eq!(foreign, orig_foreign);
            // Apply twice == apply once.
            let twice = apply(once.bytes.as_deref(), &w, &once.added).unwrap();
            prop_assert_eq!(&twice.bytes, &once.bytes);
            prop_assert_eq!(&twice.added, &once.added);
            prop_assert!(twice.changed_keys.is_empty());
            // Revert gives back an equal document, in the same key order.
            let back = revert(once.bytes.as_deref(), &once.added, false).unwrap();
            let back = parse(back.bytes.as_deref().unwrap()).unwrap();
            prop_assert_eq!(
                back.iter().collect::<Vec<_>>(),
                map.iter().collect::<Vec<_>>()
            );
        }
    }
}
