//! Names a MirrorRegistry may not claim because the cluster itself depends
//! on them: the proxy's own Service, address and names, anything under the
//! cluster domain or `.svc`, and the API server. The agent would point
//! every node's runtime at the proxy for such a name (and DNS-hijack it in
//! `/etc/hosts`), so a CR could take over in-cluster traffic the admin
//! never meant to mirror; and the proxy routes a request by its Host as a
//! registry before taking it as addressed to itself, so a registry named
//! like the proxy (its ClusterIP, say) breaks the path-prefix routing of
//! every other registry.
//! Names every cluster shares (localhost, loopback and link-local IPs) are
//! refused earlier, with the rest of the spec (`names::reserved_host`).

use std::net::IpAddr;

use pullthrough_api::names::split_port;

/// The reserved names of one installation.
#[derive(Debug, Clone)]
pub struct ReservedNames {
    exact: Vec<(String, String)>,
    suffixes: Vec<(String, String)>,
    /// IP literals, compared as addresses: `[fd00:0::1]` and `[fd00::1]`
    /// reach the same host, and so does `[::ffff:10.0.0.1]` `10.0.0.1`.
    ips: Vec<(IpAddr, String)>,
    namespace: String,
    proxy_service: String,
}

/// The address an IP literal (`10.0.0.1`, `[fd00::1]`, `fd00::1`; no
/// port) names; an IPv4-mapped IPv6 address as its IPv4 one.
fn ip_of(name: &str) -> Option<IpAddr> {
    let bare = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    match bare.parse::<IpAddr>().ok()? {
        IpAddr::V6(v6) => Some(v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)),
        v4 => Some(v4),
    }
}

/// `host` without its port or a final dot, lowercase.
fn bare_name(host: &str) -> String {
    split_port(host)
        .0
        .trim_end_matches('.')
        .to_ascii_lowercase()
}

impl ReservedNames {
    /// `proxy_service` in `namespace`, names under `cluster_domain`, the
    /// API server's host as the operator reaches it (when known), and the
    /// admin's `extra` names (`--reserved-host`).
    pub fn new(
        namespace: &str,
        proxy_service: &str,
        cluster_domain: &str,
        api_server_host: Option<&str>,
        extra: &[String],
    ) -> Self {
        let domain = cluster_domain.trim_matches('.').to_ascii_lowercase();
        let proxy = format!("the proxy's own Service {namespace}/{proxy_service}");
        let api = "the Kubernetes API server".to_string();
        let mut out = Self {
            exact: Vec::new(),
            suffixes: vec![
                (".svc".into(), "a cluster Service name".into()),
                (
                    format!(".{domain}"),
                    format!("a name under the cluster domain {domain}"),
                ),
            ],
            ips: Vec::new(),
            namespace: namespace.to_string(),
            proxy_service: proxy_service.to_string(),
        };
        for (name, why) in [
            (proxy_service.to_string(), proxy.clone()),
            (format!("{proxy_service}.{namespace}"), proxy.clone()),
            (format!("{proxy_service}.{namespace}.svc"), proxy),
            ("kubernetes".into(), api.clone()),
            ("kubernetes.default".into(), api.clone()),
            (domain.clone(), format!("the cluster domain {domain}")),
        ] {
            out.insert(&name, why);
        }
        if let Some(h) = api_server_host {
            out.insert(h, api);
        }
        for h in extra {
            out.insert(h, "reserved by --reserved-host".into());
        }
        out
    }

    /// Also the proxy's own names: `names` of its base config, and
    /// `address`, the one nodes reach it at (its Service's ClusterIP, or
    /// the base config's `proxy.address`). The proxy answers to these as
    /// itself (see `own_names` in the proxy's router).
    pub fn with_proxy(mut self, names: &[String], address: Option<&str>) -> Self {
        for n in names {
            self.insert(
                n,
                "one of the proxy's own names (`names` of its base config)".into(),
            );
        }
        if let Some(a) = address.filter(|a| !a.is_empty()) {
            self.insert(a, "the proxy's own address".into());
        }
        self
    }

    /// The proxy Service this installation reserves: namespace and name.
    pub fn proxy_service(&self) -> (&str, &str) {
        (&self.namespace, &self.proxy_service)
    }

    fn insert(&mut self, host: &str, why: String) {
        let name = bare_name(host);
        if name.is_empty() {
            return;
        }
        match ip_of(&name) {
            Some(ip) => self.ips.push((ip, why)),
            None => self.exact.push((name, why)),
        }
    }

    /// Why `host` (a registry host, alias or auth host, with an optional
    /// port) may not be claimed, or `None`.
    pub fn why(&self, host: &str) -> Option<&str> {
        let name = bare_name(host);
        if let Some(ip) = ip_of(&name) {
            return self
                .ips
                .iter()
                .find(|(i, _)| *i == ip)
                .map(|(_, why)| why.as_str());
        }
        self.exact
            .iter()
            .find(|(n, _)| *n == name)
            .or_else(|| {
                self.suffixes
                    .iter()
                    .find(|(s, _)| name.ends_with(s.as_str()))
            })
            .map(|(_, why)| why.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clusters_own_names_are_reserved() {
        let r = ReservedNames::new(
            "pullthrough",
            "pullthrough-proxy",
            "cluster.local",
            Some("api.k8s.example:6443"),
            &["API.Nodes.Example:6443".into(), "pkgs.example.".into()],
        );
        for (host, why) in [
            ("pullthrough-proxy", "the proxy's own Service"),
            (
                "pullthrough-proxy.pullthrough:443",
                "the proxy's own Service",
            ),
            (
                "pullthrough-proxy.pullthrough.svc",
                "the proxy's own Service",
            ),
            (
                "pullthrough-proxy.pullthrough.svc.cluster.local",
                "under the cluster domain",
            ),
            ("registry.kube-system.svc", "a cluster Service name"),
            ("cluster.local", "the cluster domain"),
            ("kubernetes.default", "API server"),
            (
                "kubernetes.default.svc.cluster.local.",
                "under the cluster domain",
            ),
            ("api.k8s.example", "API server"),
            // The admin's names, whatever the port or case.
            ("api.nodes.example", "--reserved-host"),
            ("api.nodes.example:443", "--reserved-host"),
            ("PKGS.example", "--reserved-host"),
        ] {
            let got = r.why(host);
            assert!(got.is_some_and(|w| w.contains(why)), "{host}: {got:?}");
        }
        for host in [
            "quay.io",
            "docker.io",
            "registry.lan:5000",
            "svc.example",
            "k8s.example",
        ] {
            assert_eq!(r.why(host), None, "{host}");
        }
    }
}

#[cfg(test)]
mod proxy_tests {
    use super::*;

    /// The proxy's ClusterIP, under any spelling of the address, and the
    /// names of its base config: a registry named so would take the
    /// requests the proxy must answer as itself.
    #[test]
    fn the_proxys_address_and_names_are_reserved_in_any_spelling() {
        let r = ReservedNames::new("ns", "proxy", "cluster.local", Some("[fd00::1]:6443"), &[])
            .with_proxy(
                &["Proxy.Example.".into(), "[fd00:0:0::50]".into()],
                Some("10.96.0.50"),
            );
        for (host, why) in [
            ("10.96.0.50", "the proxy's own address"),
            ("10.96.0.50:5000", "the proxy's own address"),
            ("[::ffff:10.96.0.50]", "the proxy's own address"),
            ("proxy.example", "base config"),
            ("proxy.example:443", "base config"),
            ("[fd00::50]", "base config"),
            ("[fd00:0000::50]:5000", "base config"),
            ("[fd00::1]", "API server"),
            ("[fd00:0::1]:443", "API server"),
        ] {
            let got = r.why(host);
            assert!(got.is_some_and(|w| w.contains(why)), "{host}: {got:?}");
        }
        for host in ["10.96.0.51", "[fd00::51]", "proxy.example.org", "10.96.0.5"] {
            assert_eq!(r.why(host), None, "{host}");
        }
        let bracketed = ReservedNames::new("ns", "proxy", "cluster.local", None, &[])
            .with_proxy(&[], Some("[fd00::50]"));
        assert!(bracketed.why("[fd00:0::50]").is_some());
        assert_eq!(r.proxy_service(), ("ns", "proxy"));
    }
}
