//! A MirrorRegistry spec as a registry-table entry: the same validation
//! the proxy applies to its file, so a CRD from an older release or
//! `--validate=false` cannot poison the table.

use std::time::Duration;

use super::MirrorRegistrySpec;
use crate::agent::NodeOptions;
use crate::config::{ConfigError, ProxyConfig, RegistryConfig};

/// Parses the subset of Go's `time.ParseDuration` syntax the CRD admits:
/// `0`, or one or more `<digits><unit>` with unit `h`, `m`, `s`, `ms`, `us`,
/// `ns` (`1h30m`, `90s`, `0s`). The same strings mean the same durations to
/// the API server's CEL `duration()`.
pub fn parse_go_duration(s: &str) -> Result<Duration, String> {
    let bad =
        || format!("`{s}` is not a duration like 30s, 10m or 1h30m (units h, m, s, ms, us, ns)");
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() {
        return Err(bad());
    }
    let mut rest = s;
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits_end = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        if digits_end == 0 {
            return Err(bad());
        }
        let n: u64 = rest[..digits_end].parse().map_err(|_| bad())?;
        rest = &rest[digits_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let nanos_per: u64 = match &rest[..unit_end] {
            "h" => 3_600_000_000_000,
            "m" => 60_000_000_000,
            "s" => 1_000_000_000,
            "ms" => 1_000_000,
            "us" => 1_000,
            "ns" => 1,
            _ => return Err(bad()),
        };
        rest = &rest[unit_end..];
        let part = n
            .checked_mul(nanos_per)
            .map(Duration::from_nanos)
            .ok_or_else(bad)?;
        total = total.checked_add(part).ok_or_else(bad)?;
    }
    Ok(total)
}

fn spec_error(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: format!("spec.{key}"),
        message: message.into(),
    }
}

/// A DNS-1123 label (a namespace's name): lowercase letters, digits and
/// `-`, starting and ending with a letter or digit, 63 characters at most.
fn is_dns_label(s: &str) -> bool {
    s.len() <= 63 && is_label(s)
}

/// A DNS-1123 subdomain (a Secret's or ConfigMap's name): labels joined
/// by `.`, 253 characters at most.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_label)
}

fn is_label(l: &str) -> bool {
    !l.is_empty()
        && !l.starts_with('-')
        && !l.ends_with('-')
        && l.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A reference to an object the operator reads (`spec.<key>`): kube-rs
/// puts its name and namespace into the request path as they are, so a
/// name the API server could not hold (`a b`, `..`) must never be asked
/// for; the CRD's patterns refuse it at `kubectl apply`, this check for
/// objects those never saw.
fn check_object_ref(key: &str, kind: &str, name: &str, namespace: &str) -> Result<(), ConfigError> {
    if !is_dns_subdomain(name) {
        return Err(spec_error(
            &format!("{key}.name"),
            format!(
                "{name:?} is not a {kind} name: lowercase letters, digits, `-` and `.`, \
                 starting and ending with a letter or digit, at most 253 characters"
            ),
        ));
    }
    if !is_dns_label(namespace) {
        return Err(spec_error(
            &format!("{key}.namespace"),
            format!(
                "{namespace:?} is not a namespace name: lowercase letters, digits and `-`, \
                 starting and ending with a letter or digit, at most 63 characters"
            ),
        ));
    }
    Ok(())
}

/// The registry-table entry for a spec, checked with the same validation the
/// proxy applies to its config file (errors name the `spec.` key).
///
/// Referenced content is the operator's job, because it needs the API
/// server: `tls.caBundle` / `tls.caBundleConfigMapRef` become a PEM the
/// operator publishes next to the table (setting `ca_bundle` to its path),
/// and `credentialsSecretRef` becomes a credentials file in a Secret only the
/// proxy mounts (setting `credentials_file`). Here both stay `None`.
impl TryFrom<&MirrorRegistrySpec> for RegistryConfig {
    type Error = ConfigError;

    fn try_from(spec: &MirrorRegistrySpec) -> Result<Self, ConfigError> {
        let names = std::iter::once(("host".to_string(), &spec.host))
            .chain(
                spec.aliases
                    .iter()
                    .enumerate()
                    .map(|(i, a)| (format!("aliases[{i}]"), a)),
            )
            .chain(
                (spec.auth_hosts.iter().enumerate()).map(|(i, a)| (format!("authHosts[{i}]"), a)),
            );
        for (key, name) in names {
            if let Some(why) = crate::names::reserved_host(name) {
                return Err(spec_error(
                    &key,
                    format!("`{name}` may not be mirrored: {why}"),
                ));
            }
        }
        if let Some(r) = &spec.credentials_secret_ref {
            check_object_ref("credentialsSecretRef", "Secret", &r.name, &r.namespace)?;
        }
        if let Some(r) = spec
            .tls
            .as_ref()
            .and_then(|t| t.ca_bundle_config_map_ref.as_ref())
        {
            check_object_ref(
                "tls.caBundleConfigMapRef",
                "ConfigMap",
                &r.name,
                &r.namespace,
            )?;
        }
        let tag_ttl = spec.tag_ttl().map_err(|m| spec_error("tagTTL", m))?;
        let tag_policy = (spec.tag_policy.iter().enumerate())
            .map(|(i, r)| {
                r.to_rule()
                    .map_err(|m| spec_error(&format!("tagPolicy[{i}]"), m))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let upstream = spec.upstream_url();
        if upstream
            .get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case("http://"))
            && !spec.allow_insecure_upstream
        {
            return Err(spec_error(
                "upstream",
                format!("`{upstream}` is plain http: set allowInsecureUpstream: true to allow it"),
            ));
        }
        let tls = spec.tls.clone().unwrap_or_default();
        let reg = RegistryConfig {
            host: spec.host.clone(),
            upstream: Some(upstream.into_owned()),
            aliases: spec.aliases.clone(),
            auth_hosts: spec.auth_hosts.clone(),
            ca_bundle: None,
            insecure_skip_verify: tls.insecure_skip_verify,
            allow_private_networks: spec.allow_private_networks,
            tag_ttl,
            tag_policy,
            upstream_reserve: spec
                .upstream_reserve
                .map_or_else(crate::config::default_upstream_reserve, u64::from),
            allow_push: spec.allow_push,
            private: spec.private,
            cache_tags: true,
            nodes: NodeOptions {
                dns_hijack: spec.nodes.dns_hijack,
                containerd: spec.nodes.containerd,
                crio: spec.nodes.crio,
            },
            ..Default::default()
        };
        // The proxy's own checks, on a one-registry table.
        let mut table = ProxyConfig {
            registries: vec![reg],
            ..Default::default()
        };
        table.validate().map_err(|e| ConfigError {
            key: e
                .key
                .strip_prefix("registries[0].")
                .map_or_else(|| e.key.clone(), |k| format!("spec.{k}")),
            message: e.message,
        })?;
        table
            .registries
            .pop()
            .ok_or_else(|| spec_error("host", "no registry"))
    }
}
