//! Name resolution for upstreams: the config's `resolve` pins, then DNS
//! from `/etc/resolv.conf`, never `/etc/hosts` (which on a node may point
//! registry names back at this proxy).

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::ResolveHosts;
use hickory_resolver::name_server::TokioConnectionProvider;
use hyper_util::client::legacy::connect::dns::Name;

/// A host name the resolver could not turn into addresses.
#[derive(Debug, thiserror::Error)]
#[error("resolving `{name}`: {reason}")]
pub struct ResolveError {
    pub name: String,
    pub reason: String,
}

/// Resolves upstream host names: `resolve` pins as given, IP literals and
/// `localhost` directly, everything else by DNS per `/etc/resolv.conf`
/// (search domains and ndots included) with the hosts file switched off.
/// A `tower::Service<Name>`, as hyper-util's `HttpConnector` wants.
#[derive(Clone)]
pub struct UpstreamResolver {
    inner: Arc<ResolverInner>,
}

pub(super) struct ResolverInner {
    pins: HashMap<String, IpAddr>,
    /// The DNS resolver, or why `/etc/resolv.conf` could not give one.
    dns: Result<TokioResolver, String>,
}

impl UpstreamResolver {
    /// Pins from the config, DNS from `/etc/resolv.conf`. An unusable
    /// resolv.conf is logged, and then only fails names that are not pinned.
    pub fn system(pins: &BTreeMap<String, IpAddr>) -> Self {
        let dns = system_dns();
        if let Err(reason) = &dns {
            tracing::warn!(%reason, "upstream DNS unavailable; only pinned names (`resolve`) and IPs will work");
        }
        Self::with_dns(pins, dns)
    }

    pub(super) fn with_dns(
        pins: &BTreeMap<String, IpAddr>,
        dns: Result<TokioResolver, String>,
    ) -> Self {
        let pins = pins
            .iter()
            .map(|(name, ip)| (normalize(name), *ip))
            .collect();
        Self {
            inner: Arc::new(ResolverInner { pins, dns }),
        }
    }

    /// The addresses for `host` (no port).
    pub async fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        let name = normalize(host);
        if let Some(ip) = self.inner.pins.get(&name) {
            return Ok(vec![*ip]);
        }
        let bare = name.trim_start_matches('[').trim_end_matches(']');
        if let Ok(ip) = bare.parse::<IpAddr>() {
            return Ok(vec![ip]);
        }
        // RFC 6761: localhost is loopback, without asking anyone.
        if name == "localhost" || name.ends_with(".localhost") {
            return Ok(vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ]);
        }
        let fail = |reason: String| ResolveError {
            name: host.to_string(),
            reason,
        };
        let dns = self
            .inner
            .dns
            .as_ref()
            .map_err(|e| fail(format!("not in `resolve` and DNS is unavailable ({e})")))?;
        let found = dns
            .lookup_ip(name.as_str())
            .await
            .map_err(|e| fail(e.to_string()))?;
        let ips: Vec<IpAddr> = found.iter().collect();
        if ips.is_empty() {
            return Err(fail("DNS returned no addresses".into()));
        }
        Ok(ips)
    }
}

pub(super) fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

pub(super) fn system_dns() -> Result<TokioResolver, String> {
    let (config, mut options) = hickory_resolver::system_conf::read_system_conf()
        .map_err(|e| format!("reading /etc/resolv.conf: {e}"))?;
    if config.name_servers().is_empty() {
        return Err("/etc/resolv.conf names no nameserver".into());
    }
    // On a node the hosts file may point registry names at this proxy.
    options.use_hosts_file = ResolveHosts::Never;
    Ok(
        TokioResolver::builder_with_config(config, TokioConnectionProvider::default())
            .with_options(options)
            .build(),
    )
}

pub(super) type ResolveFuture =
    Pin<Box<dyn Future<Output = Result<std::vec::IntoIter<SocketAddr>, ResolveError>> + Send>>;

impl tower_service::Service<Name> for UpstreamResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = ResolveError;
    type Future = ResolveFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let resolver = self.clone();
        Box::pin(async move {
            let ips = resolver.lookup(name.as_str()).await?;
            // Port 0: HttpConnector fills in the URL's port.
            Ok(ips
                .into_iter()
                .map(|ip| SocketAddr::new(ip, 0))
                .collect::<Vec<_>>()
                .into_iter())
        })
    }
}
