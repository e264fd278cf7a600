//! The registry table and proxy settings: the proxy's config file format,
//! which the operator renders from `MirrorRegistry` resources and the
//! node-agent reads too.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::agent::{NodeOptions, NodeProxy};
use crate::names::{validate_host, validate_reference_host};
pub use crate::storage::{CredentialSource, Peers, S3Credentials, S3Storage, SharedStorage};
use crate::tags::{TagPolicy, TagRule};

pub use crate::credentials::{CredentialsError, UpstreamCredentials};
pub use crate::error::ConfigError;
pub use crate::limits::Limits;

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyConfig {
    #[serde(default)]
    pub listen: Listen,
    /// Cache and generated-CA directory (`--data-dir` overrides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// CA used to mint per-registry TLS certificates; generated into the
    /// data dir when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<CaFiles>,
    /// Registry for requests that name none (dockerd `registry-mirrors`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_registry: Option<String>,
    /// The proxy's own names and IPs, as clients in mirror mode address it.
    /// Requests and TLS handshakes for any other name that is not a
    /// configured registry are refused. `localhost`, loopback IPs and the
    /// listen IPs are always included.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// Pins upstream host names to addresses instead of DNS (air-gapped
    /// setups, tests). The hosts file is never consulted for upstreams: on a
    /// node it may send registry names back to this proxy.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub resolve: BTreeMap<String, IpAddr>,
    #[serde(default)]
    pub upstream_timeouts: UpstreamTimeouts,
    /// What one client may hold of the proxy's listeners: connections,
    /// HTTP/2 streams, and how long a connection may sit without sending
    /// a request.
    #[serde(default, skip_serializing_if = "Limits::is_default")]
    pub limits: Limits,
    #[serde(default)]
    pub registries: Vec<RegistryConfig>,
    /// Size bound and eviction of the proxy's blob store.
    #[serde(default, skip_serializing_if = "CacheConfig::is_default")]
    pub cache: CacheConfig,
    /// How long an upstream "this client may read this repository" answer
    /// is reused before cached private content is served to it again.
    #[serde(
        rename = "authCheckTTL",
        with = "humantime_serde",
        default = "default_auth_check_ttl",
        skip_serializing_if = "is_default_auth_check_ttl"
    )]
    pub auth_check_ttl: Duration,
    /// Bearer token the proxy's admin API requires (or the
    /// `PULLTHROUGH_ADMIN_TOKEN` environment variable). Mandatory when the
    /// admin listener is not on loopback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token: Option<String>,
    /// How nodes reach the proxy; read by the node-agent, ignored by the
    /// proxy (see [`crate::agent`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<NodeProxy>,
    /// An object store shared by every replica; absent: the local disk only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<SharedStorage>,
    /// The other replicas, so that each blob is fetched once per cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<Peers>,
}

impl Default for ProxyConfig {
    /// What an empty file means: no listeners, no registries, defaults.
    fn default() -> Self {
        Self {
            listen: Listen::default(),
            data_dir: None,
            ca: None,
            default_registry: None,
            names: Vec::new(),
            resolve: BTreeMap::new(),
            upstream_timeouts: UpstreamTimeouts::default(),
            limits: Limits::default(),
            registries: Vec::new(),
            cache: CacheConfig::default(),
            auth_check_ttl: default_auth_check_ttl(),
            admin_token: None,
            proxy: None,
            storage: None,
            peers: None,
        }
    }
}

/// Listener addresses; each one is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Listen {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https: Option<SocketAddr>,
    /// `/healthz`, `/readyz`, `/metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CaFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA the operator has generated to take over next (the CA
    /// Secret's `next.crt`/`next.key`; absent outside a rotation). Nodes
    /// trust it from the moment it exists, so the proxy signs with it the
    /// names the current CA's name constraints do not permit (a registry
    /// added since the current CA was made). Either both or neither.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_key: Option<PathBuf>,
    /// The CA the operator's last rotation replaced (the CA Secret's
    /// `previous.crt`, kept there for one overlap; absent otherwise).
    /// Trusted for replica-to-replica TLS only, never used to sign: a
    /// replica that starts after a rotation still accepts a replica that
    /// has not yet picked the rotation up and presents an old-CA leaf.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_cert: Option<PathBuf>,
}

impl CaFiles {
    /// The next CA's (cert, key) files, when both are configured.
    pub fn next(&self) -> Option<(&std::path::Path, &std::path::Path)> {
        self.next_cert.as_deref().zip(self.next_key.as_deref())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UpstreamTimeouts {
    /// TCP + TLS connect.
    #[serde(with = "humantime_serde", default = "default_connect_timeout")]
    pub connect: Duration,
    /// Longest wait for response headers, and between body chunks.
    #[serde(with = "humantime_serde", default = "default_read_timeout")]
    pub read: Duration,
}

impl Default for UpstreamTimeouts {
    fn default() -> Self {
        Self {
            connect: default_connect_timeout(),
            read: default_read_timeout(),
        }
    }
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_read_timeout() -> Duration {
    Duration::from_secs(60)
}

/// One upstream registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryConfig {
    /// The name as written in image references (`quay.io`, `docker.io`).
    pub host: String,
    /// Base URL of the upstream; default `https://<host>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Other names routed to this registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<String>,
    /// Token-realm hosts clients reach through the proxy in DNS-hijack mode.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub auth_hosts: Vec<String>,
    /// Extra PEM roots trusted for this upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<PathBuf>,
    /// JSON file `{"username": "...", "password": "..."}` (see
    /// [`UpstreamCredentials`]) the proxy authenticates to this upstream
    /// with on behalf of clients that send no `Authorization` (Basic, or a
    /// Bearer token fetched from the challenge's realm). Setting it makes
    /// the registry's content readable by every client of the proxy,
    /// unless `private` is also set: then the file is checked but unused
    /// and every client still needs its own credentials. A relative path is
    /// taken as is, relative to the proxy's working directory (as
    /// `caBundle`). The proxy re-reads the file when its content changes
    /// (a rotated Kubernetes Secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub insecure_skip_verify: bool,
    /// Let redirects and token realms the upstream names (hosts other than
    /// `upstream` and `authHosts`) resolve to loopback, link-local, private
    /// (RFC 1918, ULA, CGNAT, ...) addresses. Off by default: an upstream
    /// must not steer the proxy into the cluster (SSRF). The proxy's own
    /// listeners stay refused either way.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_private_networks: bool,
    /// How long a tag → digest answer is reused before asking upstream.
    #[serde(
        rename = "tagTTL",
        with = "humantime_serde",
        default = "default_tag_ttl"
    )]
    pub tag_ttl: Duration,
    /// Ordered `{pattern, ttl}` rules overriding `tagTTL` per tag (see
    /// [`crate::tags`]); the first whose pattern matches the whole tag wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tag_policy: Vec<TagRule>,
    /// Pulls of the upstream's rate limit (Docker Hub's
    /// `ratelimit-remaining`) kept for pulls that need the upstream: at or
    /// under it, and while a 429's `Retry-After` runs, cached tags are
    /// served without asking the upstream.
    #[serde(
        default = "default_upstream_reserve",
        skip_serializing_if = "is_default_upstream_reserve"
    )]
    pub upstream_reserve: u64,
    /// Pass pushes through (uncached); refused otherwise.
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_push: bool,
    /// Every repository is private: cached content is served only after a
    /// per-client upstream check.
    #[serde(default, skip_serializing_if = "is_false")]
    pub private: bool,
    /// Cache tag → digest answers (default true). When false every tag
    /// request asks the upstream; the last answer is still kept for
    /// stale-if-error.
    #[serde(default = "yes", skip_serializing_if = "is_true")]
    pub cache_tags: bool,
    /// Serve cached content while the upstream cannot answer an access
    /// check (unreachable, 429, 5xx) even to clients it was never seen to
    /// let read that content (default false: only content this client
    /// class, or anyone, was recently let read is served then). Turning it
    /// on trades the per-client check for availability in an outage.
    #[serde(default, skip_serializing_if = "is_false")]
    pub serve_cached_on_auth_error: bool,
    /// Which node runtimes the node-agent configures for this registry.
    #[serde(default, skip_serializing_if = "NodeOptions::is_default")]
    pub nodes: NodeOptions,
}

impl Default for RegistryConfig {
    /// An entry with every setting at its default; `host` must be set.
    fn default() -> Self {
        Self {
            host: String::new(),
            upstream: None,
            aliases: Vec::new(),
            auth_hosts: Vec::new(),
            ca_bundle: None,
            credentials_file: None,
            insecure_skip_verify: false,
            allow_private_networks: false,
            tag_ttl: default_tag_ttl(),
            tag_policy: Vec::new(),
            upstream_reserve: default_upstream_reserve(),
            allow_push: false,
            private: false,
            cache_tags: true,
            serve_cached_on_auth_error: false,
            nodes: NodeOptions::default(),
        }
    }
}

/// 10 of Docker Hub's 100 anonymous pulls per 6 h: enough for the misses
/// that need the upstream while tags wait.
pub fn default_upstream_reserve() -> u64 {
    10
}

fn is_default_upstream_reserve(n: &u64) -> bool {
    *n == default_upstream_reserve()
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_true(b: &bool) -> bool {
    *b
}

fn yes() -> bool {
    true
}

/// Default reuse time of a per-client access check.
pub fn default_auth_check_ttl() -> Duration {
    Duration::from_secs(60)
}

fn is_default_auth_check_ttl(d: &Duration) -> bool {
    *d == default_auth_check_ttl()
}

/// `cache: {maxSize, highWatermark, lowWatermark, pinsFile}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CacheConfig {
    /// Size bound of the blob store ("10GiB", "500MiB"); unbounded if unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_size: Option<bytesize::ByteSize>,
    /// Eviction starts when usage passes this fraction of `maxSize`...
    #[serde(default = "default_high_watermark")]
    pub high_watermark: f64,
    /// ... and removes least recently used entries down to this fraction.
    #[serde(default = "default_low_watermark")]
    pub low_watermark: f64,
    /// The operator's pins (`pins.json`: images running pods and recent
    /// ReplicaSet revisions use), never evicted. Read again every reload
    /// interval; a missing file pins nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pins_file: Option<PathBuf>,
    /// How many pinned images not yet cached are fetched into the cache at
    /// once, through the proxy's own HTTP listener (0: no prefetch). Only
    /// the pins file's `platforms` of a multi-platform image; never while
    /// the registry's upstream budget is low.
    #[serde(default = "default_prefetch_concurrency")]
    pub prefetch_concurrency: usize,
}

pub(crate) fn default_prefetch_concurrency() -> usize {
    2
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_size: None,
            high_watermark: default_high_watermark(),
            low_watermark: default_low_watermark(),
            pins_file: None,
            prefetch_concurrency: default_prefetch_concurrency(),
        }
    }
}

impl CacheConfig {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

pub(crate) fn default_high_watermark() -> f64 {
    0.9
}

pub(crate) fn default_low_watermark() -> f64 {
    0.8
}

/// Default tag → digest reuse time.
pub fn default_tag_ttl() -> Duration {
    Duration::from_secs(600)
}

impl RegistryConfig {
    /// The upstream base URL (no trailing slash).
    pub fn upstream_url(&self) -> String {
        match &self.upstream {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => format!("https://{}", self.host),
        }
    }

    /// Host and aliases: every name that routes here.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.host.as_str()).chain(self.aliases.iter().map(String::as_str))
    }

    /// `tagPolicy` compiled over `tagTTL` (checked by [`ProxyConfig::validate`]).
    pub fn tag_policy(&self) -> Result<TagPolicy, crate::tags::RuleError> {
        TagPolicy::compile(&self.tag_policy, self.tag_ttl)
    }
}

impl ProxyConfig {
    /// Parses YAML; unknown keys and bad values are errors naming the key.
    pub fn from_yaml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = serde_norway::from_str(text).map_err(|e| {
            // serde_norway prefixes the message with the key path and
            // usually ends it with the position; add the position if not.
            let msg = e.to_string();
            let location = match e.location() {
                Some(l) if !msg.contains(" at line ") => {
                    format!(" at line {} column {}", l.line(), l.column())
                }
                _ => String::new(),
            };
            match msg.split_once(": ") {
                Some((path, rest)) if !path.contains(' ') => {
                    ConfigError::new(path, format!("{rest}{location}"))
                }
                _ => ConfigError::new("<document>", format!("{msg}{location}")),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// YAML text of this config.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        serde_norway::to_string(self).map_err(|e| ConfigError::new("<document>", e.to_string()))
    }

    /// Semantic checks serde cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        // Per name (see `claim_key`), the registry claiming it.
        let mut seen: HashMap<Cow<'_, str>, usize> = HashMap::new();
        for (i, reg) in self.registries.iter().enumerate() {
            let at = |k: &str| format!("registries[{i}].{k}");
            validate_reference_host(&reg.host).map_err(|m| ConfigError::new(at("host"), m))?;
            for (j, alias) in reg.aliases.iter().enumerate() {
                validate_reference_host(alias)
                    .map_err(|m| ConfigError::new(at(&format!("aliases[{j}]")), m))?;
            }
            for (j, h) in reg.auth_hosts.iter().enumerate() {
                validate_host(h)
                    .map_err(|m| ConfigError::new(at(&format!("authHosts[{j}]")), m))?;
            }
            let mut own = std::collections::HashSet::new();
            for name in reg.names().chain(reg.auth_hosts.iter().map(String::as_str)) {
                if !own.insert(name) {
                    return Err(ConfigError::new(
                        at("host"),
                        format!("`{name}` is listed twice"),
                    ));
                }
                if *seen.entry(crate::names::claim_key(name)).or_insert(i) != i {
                    return Err(ConfigError::new(
                        at("host"),
                        format!("`{name}` is claimed by more than one registry"),
                    ));
                }
            }
            reg.tag_policy().map_err(|e| {
                let key = e
                    .index
                    .map_or_else(|| "tagPolicy".into(), |j| format!("tagPolicy[{j}]"));
                ConfigError::new(at(&key), e.message)
            })?;
            if let Some(up) = &reg.upstream {
                validate_upstream(up).map_err(|m| ConfigError::new(at("upstream"), m))?;
            }
            // The file itself is read by the proxy (the operator validates
            // tables without it), so only its name is checked here.
            if reg
                .credentials_file
                .as_ref()
                .is_some_and(|p| p.as_os_str().is_empty())
            {
                return Err(ConfigError::new(
                    at("credentialsFile"),
                    "must be a file path, not empty",
                ));
            }
        }
        if let Some(ca) = &self.ca
            && ca.next_cert.is_some() != ca.next_key.is_some()
        {
            let (set, unset) = if ca.next_cert.is_some() {
                ("nextCert", "nextKey")
            } else {
                ("nextKey", "nextCert")
            };
            return Err(ConfigError::new(
                format!("ca.{unset}"),
                format!("must be set when ca.{set} is (the next CA is a certificate and its key)"),
            ));
        }
        if let Some(def) = &self.default_registry
            && self.registry(def).is_none()
        {
            return Err(ConfigError::new(
                "defaultRegistry",
                format!("`{def}` is not one of the configured registries"),
            ));
        }
        validate_watermarks("cache", self.cache.low_watermark, self.cache.high_watermark)?;
        for (i, n) in self.names.iter().enumerate() {
            validate_host(n).map_err(|m| ConfigError::new(format!("names[{i}]"), m))?;
        }
        self.validate_listeners()?;
        self.limits.validate()?;
        if let Some(proxy) = &self.proxy {
            proxy.validate()?;
        }
        if let Some(storage) = &self.storage {
            storage.validate()?;
        }
        if let Some(peers) = &self.peers {
            peers.validate()?;
        }
        Ok(())
    }

    /// No two listeners on one address (a wildcard IP takes its port on
    /// every IP; port 0 is any free port): otherwise the second bind fails
    /// after start-up work, with a less clear error than this one.
    fn validate_listeners(&self) -> Result<(), ConfigError> {
        let listeners = [
            ("listen.http", self.listen.http),
            ("listen.https", self.listen.https),
            ("listen.admin", self.listen.admin),
            ("peers.listen", self.peers.as_ref().map(|p| p.listen)),
        ];
        let set: Vec<(&str, SocketAddr)> = listeners
            .into_iter()
            .filter_map(|(k, a)| a.filter(|a| a.port() != 0).map(|a| (k, a)))
            .collect();
        for (i, (key, a)) in set.iter().enumerate() {
            for (other, b) in &set[..i] {
                let ips_meet =
                    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified();
                if a.port() == b.port() && ips_meet {
                    return Err(ConfigError::new(
                        *key,
                        format!(
                            "{a} is also {other} ({b}): each listener needs an address of its own"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The registry a name (host or alias) routes to.
    pub fn registry(&self, name: &str) -> Option<&RegistryConfig> {
        self.registries
            .iter()
            .find(|r| r.names().any(|n| n == name))
    }
}

/// `0 < low <= high <= 1`, reported on `key`.
pub(crate) fn validate_watermarks(key: &str, low: f64, high: f64) -> Result<(), ConfigError> {
    if 0.0 < low && low <= high && high <= 1.0 {
        return Ok(());
    }
    Err(ConfigError::new(
        key,
        "watermarks must satisfy 0 < lowWatermark <= highWatermark <= 1",
    ))
}

fn validate_upstream(url: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err(format!("`{url}` must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{url}` has no host"));
    }
    if uri.query().is_some() {
        return Err(format!("`{url}` must not have a query"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
listen: {http: 127.0.0.1:5080, https: 127.0.0.1:5443, admin: 127.0.0.1:9090}
dataDir: /var/lib/pullthrough
ca: {cert: ca.crt, key: ca.key}
defaultRegistry: docker.io
registries:
  - host: docker.io
    upstream: https://registry-1.docker.io
    aliases: [registry-1.docker.io]
    authHosts: [auth.docker.io]
  - host: quay.io
    upstream: https://quay.io
    aliases: []
    authHosts: []
    caBundle: /path/extra-roots.pem
    credentialsFile: /etc/pullthrough/credentials/quay.io.json
    insecureSkipVerify: false
    tagTTL: 10m
    allowPush: false
"#;

    #[test]
    fn parses_the_documented_example() {
        let c = ProxyConfig::from_yaml(FULL).unwrap();
        assert_eq!(c.registries.len(), 2);
        assert_eq!(c.registries[1].tag_ttl, Duration::from_secs(600));
        assert_eq!(
            c.registry("registry-1.docker.io").unwrap().host,
            "docker.io"
        );
        assert_eq!(c.listen.admin, Some("127.0.0.1:9090".parse().unwrap()));
        // Round trip through the operator's renderer keeps it equal.
        assert_eq!(ProxyConfig::from_yaml(&c.to_yaml().unwrap()).unwrap(), c);
    }

    fn err(yaml: &str) -> ConfigError {
        ProxyConfig::from_yaml(yaml).unwrap_err()
    }

    /// A name belongs to one registry, however its port is spelled: a
    /// client writing `quay.io:443` (Go keeps an explicit port) must not
    /// reach another registry than `quay.io`'s. One registry may list
    /// both spellings.
    #[test]
    fn a_name_is_claimed_once_whatever_its_https_port_spelling() {
        for yaml in [
            "registries:\n- host: quay.io\n- host: mirror.example\n  aliases: ['quay.io:443']\n",
            "registries:\n- host: quay.io:443\n- host: quay.io\n",
            "registries:\n- host: a.example\n- host: b.example\n  authHosts: [a.example]\n",
        ] {
            let e = err(yaml);
            assert!(
                e.to_string().contains("claimed by more than one registry"),
                "{yaml}: {e}"
            );
        }
        ProxyConfig::from_yaml("registries:\n- host: quay.io\n  aliases: ['quay.io:443']\n")
            .unwrap();
        // Another port is another name.
        ProxyConfig::from_yaml("registries:\n- host: quay.io\n- host: quay.io:5000\n").unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let e = err("registries:\n  - host: quay.io\n    tagTTL: soon\n");
        assert!(e.key.contains("registries[0]"), "{e}");
        assert!(
            e.to_string().contains("tagTTL") || e.key.contains("tagTTL"),
            "{e}"
        );

        let e = err(
            "registries:\n  - host: quay.io\n    tagPolicy:\n      - {pattern: latest, ttl: 0s}\n      - {pattern: 'v[', ttl: immutable}\n",
        );
        assert_eq!(e.key, "registries[0].tagPolicy[1]");
        assert!(e.to_string().contains("v["), "{e}");
        let e = err("registries:\n  - host: quay.io\n    tagPolicy: [{pattern: a, ttl: later}]\n");
        assert!(e.to_string().contains("later"), "{e}");

        let e = err("registries:\n  - host: quay.io\n    colour: red\n");
        assert!(e.to_string().contains("colour"), "{e}");

        let e = err("registries:\n  - host: quay.io\n  - host: quay.io\n");
        assert_eq!(e.key, "registries[1].host");

        let e = err("registries:\n  - host: quay.io\n    upstream: quay.io\n");
        assert_eq!(e.key, "registries[0].upstream");

        let e = err("registries:\n  - host: https://quay.io\n");
        assert_eq!(e.key, "registries[0].host");

        let e = err("defaultRegistry: docker.io\nregistries: []\n");
        assert_eq!(e.key, "defaultRegistry");

        let e = err("listen: {http: nowhere}\n");
        assert!(e.to_string().contains("listen"), "{e}");
        let e = err("listen: {http: 127.0.0.1:5080, admin: 127.0.0.1:5080}\n");
        assert_eq!(e.key, "listen.admin", "{e}");
        let e = err("listen: {http: '0.0.0.0:5080', https: 127.0.0.1:5080}\n");
        assert_eq!(e.key, "listen.https", "{e}");
        let ok = |y: &str| ProxyConfig::from_yaml(y).and_then(|c| c.validate()).is_ok();
        assert!(ok(
            "listen: {http: 127.0.0.1:5080, https: 127.0.0.2:5080}\n"
        ));
        assert!(ok("listen: {http: 127.0.0.1:0, https: 127.0.0.1:0}\n"));
    }

    #[test]
    fn defaults_equal_an_empty_file() {
        assert_eq!(
            ProxyConfig::from_yaml("{}").unwrap(),
            ProxyConfig::default()
        );
        let r = ProxyConfig::from_yaml("registries: [{host: a.io}]").unwrap();
        assert_eq!(
            r.registries[0],
            RegistryConfig {
                host: "a.io".into(),
                ..Default::default()
            }
        );
        let e = err("cache: {highWatermark: 0.5, lowWatermark: 0.7}\n");
        assert_eq!(e.key, "cache");
    }

    #[test]
    fn credentials_file_is_a_camel_case_path() {
        let c = ProxyConfig::from_yaml(
            "registries:\n  - host: quay.io\n    credentialsFile: creds/quay.json\n",
        )
        .unwrap();
        assert_eq!(
            c.registries[0].credentials_file.as_deref(),
            Some(std::path::Path::new("creds/quay.json"))
        );
        assert_eq!(ProxyConfig::from_yaml(&c.to_yaml().unwrap()).unwrap(), c);
        assert!(
            c.to_yaml()
                .unwrap()
                .contains("credentialsFile: creds/quay.json")
        );
        let e = err("registries:\n  - host: quay.io\n    credentialsFile: \"\"\n");
        assert_eq!(e.key, "registries[0].credentialsFile");
        let e = err("registries:\n  - host: quay.io\n    credentials_file: x\n");
        assert!(e.to_string().contains("credentials_file"), "{e}");
    }

    #[test]
    fn credentials_json_is_strict_and_never_quotes_values() {
        let c =
            UpstreamCredentials::from_json(br#"{"username": "bot", "password": "pw1"}"#).unwrap();
        assert_eq!(c.username, "bot");
        assert_eq!(c.password, "pw1");
        assert!(!format!("{c:?}").contains("pw1"), "{c:?}");
        // What the operator would render parses back.
        let rendered = serde_json::to_vec(&c).unwrap();
        assert_eq!(UpstreamCredentials::from_json(&rendered).unwrap(), c);

        let cases: [(&[u8], &str); 8] = [
            (
                br#"{"username": "bot:x", "password": "hunter2"}"#,
                "username",
            ),
            (b"username: bot", "<document>"),
            (b"[\"bot\", \"hunter2\"]", "<document>"),
            (
                br#"{"username": "bot", "password": "hunter2", "auth": "x"}"#,
                "auth",
            ),
            (br#"{"username": "bot"}"#, "password"),
            (br#"{"password": "hunter2"}"#, "username"),
            (br#"{"username": "bot", "password": ""}"#, "password"),
            (br#"{"username": "bot", "password": 12345678}"#, "password"),
        ];
        for (text, field) in cases {
            let e = UpstreamCredentials::from_json(text).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            let shown = e.to_string();
            assert!(shown.contains(field), "{shown}");
            for secret in ["hunter2", "12345678"] {
                assert!(!shown.contains(secret), "{shown}");
            }
        }
    }

    #[test]
    fn limits_have_defaults_and_bad_values_name_the_key() {
        let c = ProxyConfig::from_yaml("limits: {maxConnections: 10, headerReadTimeout: 2s}\n")
            .unwrap();
        assert_eq!(c.limits.max_connections, 10);
        assert_eq!(c.limits.max_connections_per_source, 512);
        assert_eq!(c.limits.header_read_timeout, Duration::from_secs(2));
        assert_eq!(c.limits.idle_timeout, Limits::default().idle_timeout);
        assert_eq!(c.limits.new_repository_tokens_per_minute, 60);
        assert_eq!(c.limits.new_repository_token_burst, 100);
        let c = ProxyConfig::from_yaml(
            "limits: {newRepositoryTokensPerMinute: 6, newRepositoryTokenBurst: 3}\n",
        )
        .unwrap();
        assert_eq!(
            (
                c.limits.new_repository_tokens_per_minute,
                c.limits.new_repository_token_burst
            ),
            (6, 3)
        );
        assert_eq!(ProxyConfig::from_yaml(&c.to_yaml().unwrap()).unwrap(), c);
        assert!(!ProxyConfig::default().to_yaml().unwrap().contains("limits"));
        for (yaml, key) in [
            ("limits: {maxConnections: 0}\n", "limits.maxConnections"),
            (
                "limits: {maxConnectionsPerSource: 0}\n",
                "limits.maxConnectionsPerSource",
            ),
            (
                "limits: {maxConnections: 1000001}\n",
                "limits.maxConnections",
            ),
            (
                "limits: {maxStreamsPerConnection: 0}\n",
                "limits.maxStreamsPerConnection",
            ),
            (
                "limits: {headerReadTimeout: 0s}\n",
                "limits.headerReadTimeout",
            ),
            ("limits: {idleTimeout: 1000years}\n", "limits.idleTimeout"),
            (
                "limits: {tlsHandshakeTimeout: 25h}\n",
                "limits.tlsHandshakeTimeout",
            ),
            (
                "limits: {newRepositoryTokensPerMinute: 0}\n",
                "limits.newRepositoryTokensPerMinute",
            ),
            (
                "limits: {newRepositoryTokensPerMinute: 60001}\n",
                "limits.newRepositoryTokensPerMinute",
            ),
            (
                "limits: {newRepositoryTokenBurst: 0}\n",
                "limits.newRepositoryTokenBurst",
            ),
            (
                "limits: {newRepositoryTokenBurst: 100001}\n",
                "limits.newRepositoryTokenBurst",
            ),
        ] {
            assert_eq!(err(yaml).key, key, "{yaml}");
        }
        let e = err("limits: {maxConnections: -1}\n");
        assert!(e.to_string().contains("limits"), "{e}");
        let e = err("limits: {colour: red}\n");
        assert!(e.to_string().contains("colour"), "{e}");
    }

    #[test]
    fn alias_clash_across_registries_is_rejected() {
        let e = err("registries:\n  - host: a.io\n    aliases: [b.io]\n  - host: b.io\n");
        assert_eq!(e.key, "registries[1].host");
    }
}

#[cfg(test)]
mod loader_properties {
    use proptest::prelude::*;

    use super::ProxyConfig;

    /// Keys the loader knows, misspelt ones and values of every YAML shape,
    /// so generated documents reach the validation, not only the parser.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("listen".to_string()),
            Just("http".to_string()),
            Just("names".to_string()),
            Just("registries".to_string()),
            Just("host".to_string()),
            Just("upstream".to_string()),
            Just("aliases".to_string()),
            Just("tagTTL".to_string()),
            Just("cache".to_string()),
            Just("maxSize".to_string()),
            Just("highWatermark".to_string()),
            Just("limits".to_string()),
            Just("maxConnections".to_string()),
            Just("idleTimeout".to_string()),
            Just("newRepositoryTokenBurst".to_string()),
            Just("authCheckTTL".to_string()),
            Just("defaultRegistry".to_string()),
            Just("proxy".to_string()),
            Just("address".to_string()),
            "[a-zA-Z]{1,12}",
        ]
    }

    fn scalar() -> impl Strategy<Value = String> {
        prop_oneof![
            "-?[0-9]{1,25}(\\.[0-9]{0,5})?",
            "[0-9]{1,22}(ns|ms|s|m|h|d|years|GiB|KB)",
            "[a-z0-9.:/-]{0,30}",
            Just("18446744073709551615".to_string()),
            Just("1e400".to_string()),
            Just("~".to_string()),
            Just("[]".to_string()),
            Just("{}".to_string()),
            Just("'127.0.0.1:5080'".to_string()),
            Just("\"quay.io\"".to_string()),
            "\\PC{0,12}",
        ]
    }

    fn value() -> impl Strategy<Value = String> {
        scalar().prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(", "))),
                proptest::collection::vec((key(), inner), 0..4).prop_map(|v| {
                    let body: Vec<String> = v.iter().map(|(k, v)| format!("{k}: {v}")).collect();
                    format!("{{{}}}", body.join(", "))
                }),
            ]
        })
    }

    fn document() -> impl Strategy<Value = String> {
        proptest::collection::vec((key(), value()), 0..6)
            .prop_map(|entries| entries.iter().map(|(k, v)| format!("{k}: {v}\n")).collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// YAML-ish documents: loaded or refused with an error naming a
        /// key (or `<document>`), never a panic.
        #[test]
        fn yaml_ish_documents_load_or_name_a_key(doc in document()) {
            if let Err(e) = ProxyConfig::from_yaml(&doc) {
                prop_assert!(!e.key.is_empty(), "{doc:?}: {e}");
                prop_assert!(!e.message.is_empty(), "{doc:?}: {e}");
            }
        }

        /// Arbitrary text, control characters and all.
        #[test]
        fn arbitrary_text_never_panics(doc in "\\PC{0,200}", bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = ProxyConfig::from_yaml(&doc);
            let _ = ProxyConfig::from_yaml(&String::from_utf8_lossy(&bytes));
        }
    }
}

#[cfg(test)]
mod node_section_tests {
    use crate::config::{ConfigError, ProxyConfig};

    fn proxy(yaml: &str) -> Result<ProxyConfig, ConfigError> {
        ProxyConfig::from_yaml(yaml)
    }

    #[test]
    fn proxy_section_parses_with_defaults() {
        let c =
            proxy("proxy: {address: 10.0.0.5, caFile: ca.crt}\nregistries: [{host: quay.io}]\n")
                .unwrap();
        let p = c.proxy.as_ref().unwrap();
        assert_eq!(p.https_port, 443);
        assert_eq!(p.authority(), "10.0.0.5");
        assert_eq!(p.base_url(), "https://10.0.0.5");
        assert!(c.registries[0].nodes.is_default());
        // Defaults are not written back out.
        let yaml = c.to_yaml().unwrap();
        assert!(!yaml.contains("nodes"), "{yaml}");
        assert!(!yaml.contains("httpPort"), "{yaml}");
        assert_eq!(ProxyConfig::from_yaml(&yaml).unwrap(), c);
    }

    #[test]
    fn ipv6_and_http_mode_authorities() {
        let c = proxy("proxy: {address: 'fd00::5', httpPort: 8080}\n").unwrap();
        let p = c.proxy.unwrap();
        assert!(!p.uses_tls());
        assert_eq!(p.authority(), "[fd00::5]:8080");
        assert_eq!(p.base_url(), "http://[fd00::5]:8080");
    }

    #[test]
    fn node_options_round_trip() {
        let c = proxy("registries: [{host: quay.io, nodes: {dnsHijack: false}}]\n").unwrap();
        let n = c.registries[0].nodes;
        assert!(!n.dns_hijack && n.containerd && n.crio);
        let yaml = c.to_yaml().unwrap();
        assert!(yaml.contains("dnsHijack: false"), "{yaml}");
        assert_eq!(ProxyConfig::from_yaml(&yaml).unwrap(), c);
    }

    #[test]
    fn bad_proxy_sections_name_the_key() {
        for (yaml, key) in [
            ("proxy: {address: 'x:80', caFile: a}\n", "proxy.address"),
            ("proxy: {address: 'Bad', caFile: a}\n", "proxy.address"),
            ("proxy: {address: a.b}\n", "proxy.caFile"),
            (
                "proxy: {address: a.b, caFile: a, httpsPort: 0}\n",
                "proxy.httpsPort",
            ),
            (
                "proxy: {address: a.b, caFile: a, readyUrl: 'ftp://x'}\n",
                "proxy.readyUrl",
            ),
            (
                "proxy: {address: a.b, caFile: a, neverHijack: ['Q']}\n",
                "proxy.neverHijack[0]",
            ),
        ] {
            let e = proxy(yaml).unwrap_err();
            assert_eq!(e.key, key, "{yaml}: {e}");
        }
        let e = proxy("proxy: {address: a.b, caFile: a, colour: red}\n").unwrap_err();
        assert!(e.to_string().contains("colour"), "{e}");
        let e = proxy("registries: [{host: q.io, nodes: {docker: true}}]\n").unwrap_err();
        assert!(e.to_string().contains("docker"), "{e}");
    }
}
