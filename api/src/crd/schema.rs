//! Shared schema pieces of the MirrorRegistry CRD. `host`, `aliases[]`
//! and `authHosts[]` all carry the same rules; `schema_with` keeps the Rust
//! fields plain `String`s.

use schemars::generate::SchemaGenerator;
use schemars::{Schema, json_schema};

// Shared schema pieces. `host`, `aliases[]` and `authHosts[]` all carry the
// same rules; `schema_with` keeps the Rust fields plain `String`s.

/// Longest host: a 253-character DNS name plus `:65535`.
pub(super) const HOST_MAX_LEN: u64 = 259;
/// Most aliases / auth hosts per registry (bounds the CEL cost estimate).
pub(super) const HOST_LIST_MAX_ITEMS: u64 = 32;

/// A lowercase DNS name or IPv4 address, or a bracketed IPv6 address, with
/// an optional `:port`: what an image reference's registry part looks like.
/// Port range and label lengths beyond this are checked by
/// [`crate::names::validate_host`] in the operator.
pub(super) const HOST_PATTERN: &str = r"^([a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*|\[[0-9a-f:.]+\])(:[0-9]{1,5})?$";

/// `localhost`, `*.localhost`, 127.0.0.0/8, 169.254.0.0/16, 0.0.0.0, [::1],
/// [::], fe80::/10, each with an optional port.
pub(super) const RESERVED_HOST_PATTERN: &str = r"^(([a-z0-9-]+\.)*localhost|127\.[0-9.]+|169\.254\.[0-9.]+|0\.0\.0\.0|\[(::1?|fe[89ab][0-9a-f]:[0-9a-f:.]*)\])(:[0-9]{1,5})?$";

/// A DNS-1123 subdomain: what the API server takes as a Secret's or a
/// ConfigMap's name. kube-rs puts a referenced name into the request path
/// unencoded, so anything else (`a b`, `..`) fails to build or is refused
/// by the API server: the pattern refuses such a reference at `kubectl
/// apply`, and `convert.rs` re-checks it (`InvalidSpec`) for objects the
/// pattern never saw (an older CRD, `--validate=false`).
pub(super) const OBJECT_NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A DNS-1123 label: what the API server takes as a namespace's name.
pub(super) const NAMESPACE_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";

/// Go `time.ParseDuration` syntax, restricted to non-negative whole numbers
/// of `h`, `m`, `s`, `ms`, `us`, `ns` (or a bare `0`). With at most 6 digits
/// per component and 16 characters in all, the value cannot overflow Go's
/// duration, so CEL's `duration()` never errors on what this admits.
pub(super) const TAG_TTL_PATTERN: &str = r"^(0|([0-9]{1,6}(h|m|s|ms|us|ns))+)$";
pub(super) const TAG_TTL_MAX_LEN: u64 = 16;

pub(super) fn host_rules() -> serde_json::Value {
    serde_json::json!([
        {
            "rule": "!self.contains('://')",
            "message": "must be a host name as written in image references, without a scheme (quay.io, not https://quay.io); put URLs in spec.upstream",
        },
        {
            "rule": "self.contains('://') || self == self.lowerAscii()",
            "message": "must be lowercase, as in image references",
        },
        {
            // Only when the specific rules above pass: one message per mistake.
            "rule": format!(
                "self.contains('://') || self != self.lowerAscii() || self.matches(r'{HOST_PATTERN}')"
            ),
            "message": "must be a host name or IP address with an optional :port (quay.io, registry.example:5000, [fd00::1]:5000)",
        },
        {
            // The common spellings; the operator refuses every spelling
            // (`names::reserved_host`) with Accepted=False.
            "rule": format!("!self.matches(r'{RESERVED_HOST_PATTERN}')"),
            "message": "must not be localhost or a loopback, link-local or unspecified address: those name the node itself",
        },
        {
            "rule": "!self.matches(':[0-9]{1,5}$') || (int(self.substring(self.lastIndexOf(':') + 1)) >= 1 && int(self.substring(self.lastIndexOf(':') + 1)) <= 65535)",
            "message": "port must be between 1 and 65535",
        },
    ])
}

/// [`host_rules`] for a name image references carry (`host`, `aliases[]`;
/// not `authHosts[]`, which are URL hosts): see
/// [`crate::names::validate_reference_host`].
fn reference_host_rules() -> serde_json::Value {
    let mut rules = host_rules();
    if let Some(list) = rules.as_array_mut() {
        list.push(serde_json::json!({
            "rule": "self.contains('.') || self.contains(':') || self == 'localhost'",
            "message": "a single name without a port is Docker Hub's in image references (harbor/app is docker.io/harbor/app): use the registry's name with a dot, or add its port (harbor:5000)",
        }));
    }
    rules
}

pub(super) fn host_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "minLength": 1,
        "maxLength": HOST_MAX_LEN,
        "x-kubernetes-validations": reference_host_rules(),
    })
}

fn list_schema(rules: serde_json::Value) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": HOST_LIST_MAX_ITEMS,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": HOST_MAX_LEN,
            "x-kubernetes-validations": rules,
        },
    })
}

pub(super) fn alias_list_schema(_: &mut SchemaGenerator) -> Schema {
    list_schema(reference_host_rules())
}

pub(super) fn host_list_schema(_: &mut SchemaGenerator) -> Schema {
    list_schema(host_rules())
}

/// Most `spec.prefetch` entries: each is fetched and pinned.
pub const PREFETCH_MAX_ITEMS: usize = 256;

pub(super) fn prefetch_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": PREFETCH_MAX_ITEMS,
        "x-kubernetes-list-type": "set",
        "items": {
            "type": "string",
            "minLength": 1,
            "maxLength": 512,
            // The distribution grammar's repository name, then a tag or a
            // sha256 digest.
            "pattern": "^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*(?::[A-Za-z0-9_][A-Za-z0-9._-]{0,127}|@sha256:[a-f0-9]{64})$",
        },
    })
}

pub(super) fn tag_policy_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "array",
        "maxItems": crate::tags::MAX_RULES,
        "items": {
            "type": "object",
            "required": ["pattern", "ttl"],
            "properties": {
                "pattern": {
                    "description": "Regular expression (Rust syntax) the whole tag must match, e.g. `latest|main|stable` or `v?[0-9]+\\.[0-9]+\\.[0-9]+`.",
                    "type": "string",
                    "minLength": 1,
                    "maxLength": crate::tags::MAX_PATTERN_LEN,
                },
                "ttl": {
                    "description": "`immutable` (never asked again while cached) or a Go duration from 0s to 168h (`0s`: asked on every pull).",
                    "type": "string",
                    "maxLength": TAG_TTL_MAX_LEN,
                    "x-kubernetes-validations": [{
                        "rule": format!(
                            "self == 'immutable' || (self.matches('{TAG_TTL_PATTERN}') && duration(self) <= duration('168h'))"
                        ),
                        "message": "must be `immutable` or a duration from 0s to 168h in Go syntax, e.g. 0s, 10m, 1h30m",
                    }],
                },
            },
        },
    })
}

pub(super) fn tag_ttl_schema(_: &mut SchemaGenerator) -> Schema {
    json_schema!({
        "type": "string",
        "maxLength": TAG_TTL_MAX_LEN,
        "x-kubernetes-validations": [{
            // `&&` short-circuits: duration() only sees what the pattern admits.
            "rule": format!(
                "self.matches('{TAG_TTL_PATTERN}') && duration(self) <= duration('168h')"
            ),
            "message": "must be a duration from 0s to 168h (7 days) in Go syntax, e.g. 30s, 10m, 1h30m (units h, m, s, ms, us, ns; no d)",
        }],
    })
}

/// Makes the optional properties of an object schema non-nullable, so an
/// explicit `null` in a manifest is pruned by the API server (it means
/// "unset") instead of being stored, printed as `<no value>` and handed to
/// the CEL rules.
pub(super) fn non_nullable_properties(schema: &mut Schema) {
    use serde_json::Value;
    let Some(props) = schema.get_mut("properties").and_then(Value::as_object_mut) else {
        return;
    };
    for prop in props.values_mut() {
        let Some(obj) = prop.as_object_mut() else {
            continue;
        };
        if let Some(Value::Array(types)) = obj.get_mut("type") {
            types.retain(|t| t != "null");
            if types.len() == 1 {
                let only = types.remove(0);
                obj.insert("type".into(), only);
            }
        }
        let is_null = |s: &Value| s.get("type").is_some_and(|t| t == "null");
        if let Some(Value::Array(any_of)) = obj.get("anyOf")
            && any_of.len() == 2
            && any_of.iter().any(is_null)
            && let Some(Value::Object(inner)) = any_of.iter().find(|s| !is_null(s)).cloned()
        {
            obj.remove("anyOf");
            for (k, v) in inner {
                obj.entry(k).or_insert(v);
            }
        }
    }
}
