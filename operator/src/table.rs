//! Renders the registry table (one `ProxyConfig`) from all MirrorRegistries:
//! accepted ones sorted by host, claims resolved oldest-first, content hash.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use kube::ResourceExt;
use pullthrough_api::agent::NodeProxy;
use pullthrough_api::config::{ProxyConfig, RegistryConfig};
use pullthrough_api::crd::MirrorRegistry;
use pullthrough_api::names::DOCKER_HUB;
use sha2::{Digest, Sha256};

/// Key of the table in the ConfigMap.
pub const CONFIG_KEY: &str = "config.yaml";

/// Why a MirrorRegistry is (not) in the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// `Accepted=False`; reason and message.
    Rejected {
        reason: String,
        message: String,
    },
}

/// Reasons of `Accepted=False`.
pub mod reason {
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const DUPLICATE_HOST: &str = "DuplicateHost";
    pub const UNSUPPORTED: &str = "Unsupported";
}

/// The rendered table.
#[derive(Debug, Clone)]
pub struct Table {
    /// `config.yaml`.
    pub yaml: String,
    /// sha256 hex of `yaml`.
    pub hash: String,
    /// Extra ConfigMap keys (`tls.caBundle` PEMs).
    pub extra: BTreeMap<String, String>,
    /// Per MirrorRegistry name.
    pub verdicts: HashMap<String, Verdict>,
}

/// sha256 hex of `text`.
pub fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// ConfigMap key holding the CA bundle of `host`.
pub fn ca_bundle_key(host: &str) -> String {
    let safe: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("cabundle-{safe}.pem")
}

/// Renders the table from every MirrorRegistry (deleting ones are left
/// out). Older resources (creationTimestamp, then name) win host claims.
pub fn render(
    base: &ProxyConfig,
    crs: &[std::sync::Arc<MirrorRegistry>],
    proxy: Option<NodeProxy>,
    mount_path: &Path,
) -> Result<Table, pullthrough_api::config::ConfigError> {
    let mut live: Vec<&MirrorRegistry> = crs
        .iter()
        .map(|c| c.as_ref())
        .filter(|c| c.metadata.deletion_timestamp.is_none())
        .collect();
    live.sort_by(|a, b| {
        let ts = |c: &MirrorRegistry| c.metadata.creation_timestamp.as_ref().map(|t| t.0);
        ts(a)
            .cmp(&ts(b))
            .then_with(|| a.name_any().cmp(&b.name_any()))
    });
    let mut claimed: HashMap<String, String> = HashMap::new();
    let mut verdicts = HashMap::new();
    let mut registries = Vec::new();
    let mut extra = BTreeMap::new();
    for cr in live {
        let name = cr.name_any();
        let mut reg = match RegistryConfig::try_from(&cr.spec) {
            Ok(r) => r,
            Err(e) => {
                verdicts.insert(
                    name,
                    Verdict::Rejected {
                        reason: reason::INVALID_SPEC.into(),
                        message: e.to_string(),
                    },
                );
                continue;
            }
        };
        let tls = cr.spec.tls.clone().unwrap_or_default();
        if tls.ca_bundle_config_map_ref.is_some() {
            verdicts.insert(
                name,
                Verdict::Rejected {
                    reason: reason::UNSUPPORTED.into(),
                    message: "spec.tls.caBundleConfigMapRef is not supported by this operator yet: put the PEM in spec.tls.caBundle".into(),
                },
            );
            continue;
        }
        let names: Vec<&str> = reg
            .names()
            .chain(reg.auth_hosts.iter().map(String::as_str))
            .collect();
        if let Some((n, owner)) = names
            .iter()
            .find_map(|n| claimed.get(*n).map(|o| (n.to_string(), o.clone())))
        {
            verdicts.insert(
                name,
                Verdict::Rejected {
                    reason: reason::DUPLICATE_HOST.into(),
                    message: format!("`{n}` is already served by MirrorRegistry {owner}"),
                },
            );
            continue;
        }
        for n in names {
            claimed.insert(n.to_string(), name.clone());
        }
        if let Some(pem) = tls.ca_bundle {
            let key = ca_bundle_key(&reg.host);
            reg.ca_bundle = Some(mount_path.join(&key));
            extra.insert(key, pem);
        }
        registries.push(reg);
        verdicts.insert(name, Verdict::Accepted);
    }
    registries.sort_by(|a, b| a.host.cmp(&b.host));
    let mut config = base.clone();
    config.default_registry = registries
        .iter()
        .any(|r| r.host == DOCKER_HUB)
        .then(|| DOCKER_HUB.to_string());
    config.registries = registries;
    config.proxy = proxy;
    config.validate()?;
    let yaml = config.to_yaml()?;
    Ok(Table {
        hash: sha256_hex(&yaml),
        yaml,
        extra,
        verdicts,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use std::sync::Arc;

    pub fn cr(name: &str, secs: i64, yaml: &str) -> Arc<MirrorRegistry> {
        let mut c = MirrorRegistry::new(name, serde_norway::from_str(yaml).unwrap());
        c.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(secs).unwrap(),
        ));
        Arc::new(c)
    }

    fn empty() -> ProxyConfig {
        ProxyConfig::from_yaml("{}").unwrap()
    }

    #[test]
    fn sorted_by_host_oldest_claim_wins_and_stable() {
        let crs = vec![
            cr("z", 1, "host: quay.io\n"),
            cr("a", 2, "host: docker.io\n"),
            cr("dup", 3, "host: other.io\naliases: [quay.io]\n"),
            cr("bad", 0, "host: bad.io\naliases: [bad.io]\n"),
        ];
        let t = render(&empty(), &crs, None, Path::new("/m")).unwrap();
        let c = ProxyConfig::from_yaml(&t.yaml).unwrap();
        let hosts: Vec<_> = c.registries.iter().map(|r| r.host.as_str()).collect();
        assert_eq!(hosts, ["docker.io", "quay.io"]);
        assert_eq!(c.default_registry.as_deref(), Some("docker.io"));
        assert_eq!(t.verdicts["z"], Verdict::Accepted);
        assert!(
            matches!(&t.verdicts["dup"], Verdict::Rejected { reason, .. } if reason == "DuplicateHost")
        );
        assert!(
            matches!(&t.verdicts["bad"], Verdict::Rejected { reason, .. } if reason == "InvalidSpec")
        );
        let mut rev = crs.clone();
        rev.reverse();
        assert_eq!(
            render(&empty(), &rev, None, Path::new("/m")).unwrap().hash,
            t.hash
        );
        assert_eq!(t.hash, sha256_hex(&t.yaml));
    }

    #[test]
    fn ca_bundle_is_published_as_a_key() {
        let crs = vec![cr(
            "a",
            1,
            "host: reg.lan:5000\ntls: {caBundle: \"-----BEGIN CERTIFICATE-----\\nx\\n\"}\n",
        )];
        let t = render(&empty(), &crs, None, Path::new("/m")).unwrap();
        assert!(t.extra.contains_key("cabundle-reg.lan_5000.pem"));
        assert!(
            t.yaml.contains("/m/cabundle-reg.lan_5000.pem"),
            "{}",
            t.yaml
        );
    }
}
