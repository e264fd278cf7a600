//! Renders the registry table (one `ProxyConfig`) from all MirrorRegistries:
//! accepted ones sorted by host, claims resolved oldest-first, content hash.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use kube::ResourceExt;
use pullthrough_api::agent::NodeProxy;
use pullthrough_api::config::{ProxyConfig, RegistryConfig};
use pullthrough_api::contract::config_hash;
use pullthrough_api::crd::MirrorRegistry;
use pullthrough_api::names::{DOCKER_HUB, claim_key};
use pullthrough_api::pki::PermittedNames;

use crate::refs::Refs;
use crate::reserved::ReservedNames;

/// Key of the table in the ConfigMap.
pub use pullthrough_api::contract::TABLE_KEY as CONFIG_KEY;

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

impl Verdict {
    fn rejected(reason: &str, message: impl Into<String>) -> Self {
        Verdict::Rejected {
            reason: reason.into(),
            message: message.into(),
        }
    }
}

/// Reasons of `Accepted=False`.
pub mod reason {
    pub const INVALID_SPEC: &str = "InvalidSpec";
    pub const DUPLICATE_HOST: &str = "DuplicateHost";
    /// A host, alias or auth host the cluster itself depends on.
    pub const RESERVED_HOST: &str = "ReservedHost";
    /// `spec.tls.caBundleConfigMapRef` cannot be read or holds no PEM.
    pub const CA_BUNDLE_UNAVAILABLE: &str = "CABundleUnavailable";
    /// `spec.credentialsSecretRef` cannot be read or holds no credentials.
    pub const CREDENTIALS_UNAVAILABLE: &str = "CredentialsUnavailable";
    /// With this registry (its CA bundle, mostly) the table ConfigMap
    /// would pass [`super::TABLE_MAX_BYTES`].
    pub const TABLE_TOO_LARGE: &str = "TableTooLarge";
    /// The reasons whose registry claims none of its names: another
    /// registry may have them. (One refused for its CA bundle, credentials
    /// or size keeps them, see [`super::render`].)
    pub const CLAIMS_NOTHING: &[&str] = &[INVALID_SPEC, DUPLICATE_HOST, RESERVED_HOST];
}

/// What the table ConfigMap (`config.yaml` and the CA bundle keys) may
/// hold. The API server refuses a ConfigMap over 1 MiB, and a refused
/// table write fails every reconcile: no status anywhere, no deletion
/// finished. Registries are taken oldest first while they fit, so a
/// newer one with a large CA bundle is refused alone, with a reason.
pub const TABLE_MAX_BYTES: usize = 900 * 1024;

/// Where the proxy finds what the table points at.
#[derive(Debug, Clone)]
pub struct Mounts {
    /// The table ConfigMap's directory (CA bundle keys).
    pub table: PathBuf,
    /// The credentials Secret's directory.
    pub credentials: PathBuf,
}

/// The rendered table.
#[derive(Clone)]
pub struct Table {
    /// `config.yaml`.
    pub yaml: String,
    /// sha256 hex of `yaml`.
    pub hash: String,
    /// Extra ConfigMap keys (`tls.caBundle` PEMs).
    pub extra: BTreeMap<String, String>,
    /// Keys of the proxy's credentials Secret (`<host>.json`), never in the
    /// ConfigMap the agents read.
    pub credentials: BTreeMap<String, String>,
    /// Per MirrorRegistry name.
    pub verdicts: HashMap<String, Verdict>,
    /// Per accepted host, a digest of what the table says about it: its
    /// entry and everything besides the registries (the proxy's address,
    /// limits). A proxy or node running an older table whose digest for
    /// a host is the same serves that host as this table would, so one
    /// registry's change does not mark every other one pending.
    pub entries: BTreeMap<String, String>,
    /// What the proxy CA must permit to serve this table (its name
    /// constraints): every registry name and the proxy's own names.
    pub permitted: PermittedNames,
}

/// Everything but the credentials' content, which a debug line or a
/// panic message must never carry: their keys only.
impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table")
            .field("hash", &self.hash)
            .field("yaml", &self.yaml)
            .field("extra", &self.extra.keys().collect::<Vec<_>>())
            .field("credentials", &self.credentials.keys().collect::<Vec<_>>())
            .field("verdicts", &self.verdicts)
            .field("entries", &self.entries)
            .field("permitted", &self.permitted)
            .finish()
    }
}

/// `host` as a file name (`:` → `_`).
fn file_safe(host: &str) -> String {
    host.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// ConfigMap key holding the CA bundle of `host`.
pub fn ca_bundle_key(host: &str) -> String {
    format!("cabundle-{}.pem", file_safe(host))
}

/// Credentials Secret key of `host`.
pub fn credentials_key(host: &str) -> String {
    format!("{}.json", file_safe(host))
}

/// Renders the table from every MirrorRegistry (deleting ones are left
/// out). Older resources (creationTimestamp, then name) win host claims.
pub fn render(
    base: &ProxyConfig,
    crs: &[std::sync::Arc<MirrorRegistry>],
    proxy: Option<NodeProxy>,
    mounts: &Mounts,
    refs: &Refs,
    reserved: &ReservedNames,
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
    // The proxy answers to its address and base names as itself; a
    // registry claiming one would take those requests from it.
    let reserved = reserved
        .clone()
        .with_proxy(&base.names, proxy.as_ref().map(|p| p.address.as_str()));
    let mut claimed: HashMap<String, String> = HashMap::new();
    let mut verdicts = HashMap::new();
    let mut registries = Vec::new();
    let mut extra = BTreeMap::new();
    let mut credentials = BTreeMap::new();
    // The ConfigMap's size so far: the base config, then each registry's
    // entry (as it will be rendered) and CA bundle key.
    let mut table_bytes = base.to_yaml()?.len();
    for cr in live {
        let name = cr.name_any();
        let mut reg = match RegistryConfig::try_from(&cr.spec) {
            Ok(r) => r,
            Err(e) => {
                verdicts.insert(name, Verdict::rejected(reason::INVALID_SPEC, e.to_string()));
                continue;
            }
        };
        // Claims first: an older registry whose Secret is briefly
        // unreadable keeps its host rather than losing it to a newer one.
        let names: Vec<&str> = reg
            .names()
            .chain(reg.auth_hosts.iter().map(String::as_str))
            .collect();
        if let Some((n, why)) = names.iter().find_map(|n| reserved.why(n).map(|w| (n, w))) {
            verdicts.insert(
                name,
                Verdict::rejected(
                    reason::RESERVED_HOST,
                    format!("`{n}` may not be mirrored: it is {why}"),
                ),
            );
            continue;
        }
        if let Some((n, owner)) = names.iter().find_map(|n| {
            claimed
                .get(claim_key(n).as_ref())
                .map(|o| (n.to_string(), o.clone()))
        }) {
            verdicts.insert(
                name,
                Verdict::rejected(
                    reason::DUPLICATE_HOST,
                    format!("`{n}` is already served by MirrorRegistry {owner}"),
                ),
            );
            continue;
        }
        for n in names {
            claimed.insert(claim_key(n).into_owned(), name.clone());
        }
        let tls = cr.spec.tls.clone().unwrap_or_default();
        let ca_bundle = match (&tls.ca_bundle, &tls.ca_bundle_config_map_ref) {
            (Some(pem), _) => Some(pem.clone()),
            (None, Some(r)) => match refs.ca_bundle(r) {
                Ok(pem) => Some(pem),
                Err(message) => {
                    verdicts.insert(
                        name,
                        Verdict::rejected(
                            reason::CA_BUNDLE_UNAVAILABLE,
                            format!("spec.tls.caBundleConfigMapRef: {message}"),
                        ),
                    );
                    continue;
                }
            },
            (None, None) => None,
        };
        let creds = match &cr.spec.credentials_secret_ref {
            None => None,
            Some(r) => {
                let upstream_host = reg
                    .upstream
                    .as_deref()
                    .and_then(|u| u.parse::<http::Uri>().ok())
                    .and_then(|u| u.authority().map(|a| a.to_string()));
                let mut names: Vec<&str> = reg.names().collect();
                names.extend(upstream_host.as_deref());
                match refs.credentials(r, &names) {
                    Ok(c) => Some(c),
                    Err(message) => {
                        verdicts.insert(
                            name,
                            Verdict::rejected(
                                reason::CREDENTIALS_UNAVAILABLE,
                                format!("spec.credentialsSecretRef: {message}"),
                            ),
                        );
                        continue;
                    }
                }
            }
        };
        let bundle = ca_bundle.map(|pem| (ca_bundle_key(&reg.host), pem));
        if let Some((key, _)) = &bundle {
            reg.ca_bundle = Some(mounts.table.join(key));
        }
        if creds.is_some() {
            reg.credentials_file = Some(mounts.credentials.join(credentials_key(&reg.host)));
        }
        let entry_bytes = serde_norway::to_string(&reg).map_or(0, |y| y.len())
            + bundle.as_ref().map_or(0, |(k, pem)| k.len() + pem.len());
        if table_bytes + entry_bytes > TABLE_MAX_BYTES {
            verdicts.insert(
                name,
                Verdict::rejected(
                    reason::TABLE_TOO_LARGE,
                    format!(
                        "the registry table ConfigMap would pass {TABLE_MAX_BYTES} bytes with this registry ({entry_bytes} bytes, {} of them its CA bundle; {table_bytes} bytes taken by older registries): trim spec.tls's bundle to the CAs this registry needs",
                        bundle.as_ref().map_or(0, |(_, pem)| pem.len())
                    ),
                ),
            );
            // Its names stay claimed: a newer registry must not take a
            // host because this one's bundle is too big.
            continue;
        }
        table_bytes += entry_bytes;
        if let Some((key, pem)) = bundle {
            extra.insert(key, pem);
        }
        if let Some(c) = creds {
            credentials.insert(credentials_key(&reg.host), c.to_json());
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
    let entries = entry_digests(&config)?;
    // The proxy's pod IP is not known here; it serves its own IPs only
    // through the Service address in `proxy`, which is included.
    let permitted = PermittedNames::for_config(&config, &[]);
    Ok(Table {
        permitted,
        hash: config_hash(yaml.as_bytes()),
        yaml,
        extra,
        credentials,
        verdicts,
        entries,
    })
}

/// [`Table::entries`]: per registry, the hash of the table reduced to
/// that registry.
fn entry_digests(
    config: &ProxyConfig,
) -> Result<BTreeMap<String, String>, pullthrough_api::config::ConfigError> {
    let mut one = config.clone();
    config
        .registries
        .iter()
        .map(|r| {
            one.registries = vec![r.clone()];
            Ok((r.host.clone(), config_hash(one.to_yaml()?.as_bytes())))
        })
        .collect()
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

    fn reserved() -> ReservedNames {
        ReservedNames::new("ns", "proxy", "cluster.local", None, &[])
    }

    /// `crs` rendered with an empty base config, no proxy Service, no
    /// references and the default reserved names.
    fn render_plain(crs: &[Arc<MirrorRegistry>]) -> Table {
        render(
            &empty(),
            crs,
            None,
            &mounts(),
            &Refs::default(),
            &reserved(),
        )
        .unwrap()
    }

    fn mounts() -> Mounts {
        Mounts {
            table: "/m".into(),
            credentials: "/c".into(),
        }
    }

    fn rejected(t: &Table, name: &str) -> (String, String) {
        match &t.verdicts[name] {
            Verdict::Rejected { reason, message } => (reason.clone(), message.clone()),
            v => panic!("{name}: {v:?}"),
        }
    }

    /// Issue #10, point 11: a CR cannot claim the proxy's own Service, a
    /// cluster-internal name or the API server under any name field, and
    /// a refused CR claims nothing (a later CR may still use its free names).
    #[test]
    fn names_the_cluster_depends_on_are_refused() {
        let crs = vec![
            cr("self", 1, "host: proxy.ns.svc\n"),
            cr(
                "svc",
                2,
                "host: quay.io\naliases: [registry.kube-system.svc.cluster.local]\n",
            ),
            cr(
                "api",
                3,
                "host: docker.io\nauthHosts: ['kubernetes.default:443']\n",
            ),
            cr("fine", 4, "host: quay.io\n"),
        ];
        let t = render_plain(&crs);
        for (name, says) in [
            (
                "self",
                "`proxy.ns.svc` may not be mirrored: it is the proxy's own Service ns/proxy",
            ),
            ("svc", "under the cluster domain cluster.local"),
            ("api", "the Kubernetes API server"),
        ] {
            let (reason, message) = rejected(&t, name);
            assert_eq!(reason, reason::RESERVED_HOST, "{name}");
            assert!(message.contains(says), "{name}: {message}");
        }
        assert_eq!(t.verdicts["fine"], Verdict::Accepted);
        let c = ProxyConfig::from_yaml(&t.yaml).unwrap();
        let hosts: Vec<_> = c.registries.iter().map(|r| r.host.as_str()).collect();
        assert_eq!(hosts, ["quay.io"]);
    }

    /// The proxy's ClusterIP (the address nodes reach it at) and its base
    /// config's names are its own: a registry under one, in any spelling
    /// of the address, would turn every request the proxy must answer as
    /// itself (path-prefix routing for all registries) into that
    /// registry's.
    #[test]
    fn the_proxys_address_and_names_are_refused() {
        let proxy: NodeProxy =
            serde_norway::from_str("address: 10.96.0.50\nhttpPort: 80\n").unwrap();
        let base = ProxyConfig::from_yaml("names: [pullthrough.example, '[fd00::7]']\n").unwrap();
        let crs = vec![
            cr("ip", 1, "host: 10.96.0.50\n"),
            cr(
                "ip-port",
                2,
                "host: quay.io\naliases: ['10.96.0.50:5000']\n",
            ),
            cr("name", 3, "host: pullthrough.example\n"),
            cr("v6", 4, "host: '[fd00:0::7]:5000'\n"),
            cr("fine", 5, "host: 10.96.0.51\n"),
        ];
        let t = render(
            &base,
            &crs,
            Some(proxy),
            &mounts(),
            &Refs::default(),
            &reserved(),
        )
        .unwrap();
        for (name, says) in [
            ("ip", "the proxy's own address"),
            ("ip-port", "the proxy's own address"),
            ("name", "`names` of its base config"),
            ("v6", "`names` of its base config"),
        ] {
            let (reason, message) = rejected(&t, name);
            assert_eq!(reason, reason::RESERVED_HOST, "{name}: {message}");
            assert!(message.contains(says), "{name}: {message}");
        }
        assert_eq!(t.verdicts["fine"], Verdict::Accepted);
    }

    #[test]
    fn sorted_by_host_oldest_claim_wins_and_stable() {
        let crs = vec![
            cr("z", 1, "host: quay.io\n"),
            cr("a", 2, "host: docker.io\n"),
            cr("dup", 3, "host: other.io\naliases: [quay.io]\n"),
            // The same name with the HTTPS port written out.
            cr("dup443", 4, "host: more.io\naliases: ['quay.io:443']\n"),
            cr("bad", 0, "host: bad.io\naliases: [bad.io]\n"),
        ];
        let t = render_plain(&crs);
        let c = ProxyConfig::from_yaml(&t.yaml).unwrap();
        let hosts: Vec<_> = c.registries.iter().map(|r| r.host.as_str()).collect();
        assert_eq!(hosts, ["docker.io", "quay.io"]);
        assert_eq!(c.default_registry.as_deref(), Some("docker.io"));
        assert_eq!(t.verdicts["z"], Verdict::Accepted);
        for dup in ["dup", "dup443"] {
            assert!(
                matches!(&t.verdicts[dup], Verdict::Rejected { reason, .. } if reason == "DuplicateHost"),
                "{dup}"
            );
        }
        assert!(
            matches!(&t.verdicts["bad"], Verdict::Rejected { reason, .. } if reason == "InvalidSpec")
        );
        let mut rev = crs.clone();
        rev.reverse();
        assert_eq!(
            render(
                &empty(),
                &rev,
                None,
                &mounts(),
                &Refs::default(),
                &reserved()
            )
            .unwrap()
            .hash,
            t.hash
        );
        assert_eq!(t.hash, config_hash(t.yaml.as_bytes()));
    }

    /// One IPv6 address is one claim however it is written (zero runs,
    /// padding, the HTTPS port): clients reach the same registry by any
    /// spelling, so two registries under two spellings would be two
    /// configurations of one host.
    #[test]
    fn one_ipv6_address_in_two_spellings_is_claimed_once() {
        let crs = vec![
            cr(
                "first",
                1,
                "host: '[fd00::1]'
",
            ),
            cr(
                "second",
                2,
                "host: '[fd00:0000::0001]:443'
",
            ),
            cr(
                "other-port",
                3,
                "host: '[fd00:0::1]:5000'
",
            ),
        ];
        let t = render_plain(&crs);
        assert_eq!(t.verdicts["first"], Verdict::Accepted);
        let (reason, message) = rejected(&t, "second");
        assert_eq!(reason, reason::DUPLICATE_HOST, "{message}");
        assert!(message.contains("MirrorRegistry first"), "{message}");
        // Another port is another registry.
        assert_eq!(t.verdicts["other-port"], Verdict::Accepted);
    }

    /// Credentials reach the proxy's Secret only: a table printed for
    /// debugging names their keys, not their content.
    #[test]
    fn a_printed_table_holds_no_credentials() {
        let refs = Refs::default().with_secret(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "creds", "namespace": "team"},
                "stringData": {},
                "data": {"username": "cm9ib3Q=", "password": "aHVudGVyMg=="}
            }))
            .unwrap(),
        );
        let crs = vec![cr(
            "a",
            1,
            "host: reg.example\ncredentialsSecretRef: {name: creds, namespace: team}\n",
        )];
        let t = render(&empty(), &crs, None, &mounts(), &refs, &reserved()).unwrap();
        assert!(t.credentials["reg.example.json"].contains("hunter2"));
        let printed = format!("{t:?}");
        assert!(printed.contains("reg.example.json"), "{printed}");
        assert!(!printed.contains("hunter2"), "{printed}");
    }

    #[test]
    fn ca_bundle_is_published_as_a_key() {
        let crs = vec![cr(
            "a",
            1,
            "host: reg.lan:5000\ntls: {caBundle: \"-----BEGIN CERTIFICATE-----\\nx\\n\"}\n",
        )];
        let t = render_plain(&crs);
        assert!(t.extra.contains_key("cabundle-reg.lan_5000.pem"));
        assert!(
            t.yaml.contains("/m/cabundle-reg.lan_5000.pem"),
            "{}",
            t.yaml
        );
    }

    /// Two registries with 600 KB CA bundles (a system bundle copied
    /// twice, say) would make a table ConfigMap the API server refuses,
    /// and a refused table write fails every reconcile. The newer one is
    /// refused alone, its names kept; the others, later ones included,
    /// still make the table.
    #[test]
    fn a_table_past_the_configmap_limit_refuses_the_newest_bundle() {
        let pem = format!(
            "-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n",
            "A".repeat(600 * 1024)
        );
        let big = |host: &str| format!("host: {host}\ntls: {{caBundle: {pem:?}}}\n");
        let crs = vec![
            cr("older", 1, &big("a.example")),
            cr("newer", 2, &big("b.example")),
            cr("late-small", 3, "host: c.example\n"),
            cr("late-same-host", 4, "host: b.example\n"),
        ];
        let t = render_plain(&crs);
        assert_eq!(t.verdicts["older"], Verdict::Accepted);
        assert_eq!(t.verdicts["late-small"], Verdict::Accepted);
        let (reason, message) = rejected(&t, "newer");
        assert_eq!(reason, reason::TABLE_TOO_LARGE, "{message}");
        assert!(message.contains("CA bundle"), "{message}");
        assert_eq!(rejected(&t, "late-same-host").0, reason::DUPLICATE_HOST);
        let size = t.yaml.len()
            + t.extra
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        assert!(size <= TABLE_MAX_BYTES, "{size} bytes");
        assert!(
            !t.yaml.contains("b.example"),
            "{}",
            &t.yaml[..t.yaml.len().min(400)]
        );
    }

    /// A registry's entry digest moves with its own entry and with what
    /// every registry shares (the proxy's address), not with another
    /// registry's edit: that is what keeps one registry's change from
    /// marking every other one pending.
    #[test]
    fn entry_digests_follow_the_entry_and_the_shared_parts() {
        let render_with = |b: &str, proxy: Option<&str>| {
            let crs = vec![cr("a", 1, "host: a.example\n"), cr("b", 2, b)];
            let proxy = proxy.map(|address| NodeProxy {
                address: address.into(),
                ..serde_norway::from_str("address: x\nhttpPort: 80\n").unwrap()
            });
            render(
                &empty(),
                &crs,
                proxy,
                &mounts(),
                &Refs::default(),
                &reserved(),
            )
            .unwrap()
        };
        let t1 = render_with("host: b.example\n", Some("10.0.0.1"));
        let t2 = render_with("host: b.example\naliases: [b2.example]\n", Some("10.0.0.1"));
        let t3 = render_with("host: b.example\naliases: [b2.example]\n", Some("10.0.0.2"));
        assert_ne!(t1.hash, t2.hash);
        assert_eq!(t1.entries["a.example"], t2.entries["a.example"]);
        assert_ne!(t1.entries["b.example"], t2.entries["b.example"]);
        assert_ne!(t2.entries["a.example"], t3.entries["a.example"]);
        assert_ne!(t2.entries["b.example"], t3.entries["b.example"]);
    }

    #[test]
    fn ca_bundle_config_map_ref_is_copied_into_the_table() {
        let pem = "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n";
        let refs = Refs::default().with_config_map("ns", "roots", &[("ca.crt", pem)]);
        let crs = vec![
            cr(
                "a",
                1,
                "host: reg.lan\ntls: {caBundleConfigMapRef: {name: roots, namespace: ns}}\n",
            ),
            cr(
                "b",
                2,
                "host: other.lan\ntls: {caBundleConfigMapRef: {name: roots, namespace: ns, key: nope}}\n",
            ),
            cr(
                "c",
                3,
                "host: third.lan\ntls: {caBundleConfigMapRef: {name: gone, namespace: ns}}\n",
            ),
        ];
        let t = render(&empty(), &crs, None, &mounts(), &refs, &reserved()).unwrap();
        assert_eq!(t.extra["cabundle-reg.lan.pem"], pem);
        let c = ProxyConfig::from_yaml(&t.yaml).unwrap();
        assert_eq!(
            c.registry("reg.lan").unwrap().ca_bundle.as_deref(),
            Some(std::path::Path::new("/m/cabundle-reg.lan.pem"))
        );
        let (reason, message) = rejected(&t, "b");
        assert_eq!(reason, "CABundleUnavailable");
        assert!(message.contains("no key `nope`"), "{message}");
        let (reason, message) = rejected(&t, "c");
        assert_eq!(reason, "CABundleUnavailable");
        assert!(message.contains("was not read"), "{message}");
        assert!(c.registry("other.lan").is_none());
    }

    #[test]
    fn credentials_go_to_the_secret_not_the_table() {
        use k8s_openapi::ByteString;
        let mut s = k8s_openapi::api::core::v1::Secret::default();
        s.metadata.name = Some("creds".into());
        s.metadata.namespace = Some("ns".into());
        s.data = Some(
            [("username", "robot"), ("password", "hunter2")]
                .iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        );
        let refs = Refs::default().with_secret(s);
        let crs = vec![
            cr(
                "a",
                1,
                "host: reg.lan:5000\ncredentialsSecretRef: {name: creds, namespace: ns}\n",
            ),
            cr(
                "b",
                2,
                "host: b.lan\ncredentialsSecretRef: {name: missing, namespace: ns}\n",
            ),
        ];
        let t = render(&empty(), &crs, None, &mounts(), &refs, &reserved()).unwrap();
        assert!(!t.yaml.contains("hunter2"), "{}", t.yaml);
        assert_eq!(
            t.credentials["reg.lan_5000.json"],
            r#"{"username":"robot","password":"hunter2"}"#
        );
        let c = ProxyConfig::from_yaml(&t.yaml).unwrap();
        assert_eq!(
            c.registry("reg.lan:5000")
                .unwrap()
                .credentials_file
                .as_deref(),
            Some(std::path::Path::new("/c/reg.lan_5000.json"))
        );
        assert_eq!(rejected(&t, "b").0, "CredentialsUnavailable");
    }
}
