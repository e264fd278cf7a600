//! Names a MirrorRegistry may not claim because the cluster itself depends
//! on them: the proxy's own Service, anything under the cluster domain or
//! `.svc`, and the API server. The agent would point every node's runtime
//! at the proxy for such a name (and DNS-hijack it in `/etc/hosts`), so a
//! CR could take over in-cluster traffic the admin never meant to mirror.
//! Names every cluster shares (localhost, loopback and link-local IPs) are
//! refused earlier, with the rest of the spec (`names::reserved_host`).

use pullthrough_api::names::split_port;

/// The reserved names of one installation.
#[derive(Debug, Clone)]
pub struct ReservedNames {
    exact: Vec<(String, String)>,
    suffixes: Vec<(String, String)>,
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
        let mut exact = vec![
            (proxy_service.to_string(), proxy.clone()),
            (format!("{proxy_service}.{namespace}"), proxy.clone()),
            (format!("{proxy_service}.{namespace}.svc"), proxy),
            ("kubernetes".into(), api.clone()),
            ("kubernetes.default".into(), api.clone()),
            (domain.clone(), format!("the cluster domain {domain}")),
        ];
        if let Some(h) = api_server_host {
            exact.push((split_port(h).0.to_ascii_lowercase(), api));
        }
        for h in extra {
            let name = split_port(h).0.trim_end_matches('.').to_ascii_lowercase();
            exact.push((name, "reserved by --reserved-host".into()));
        }
        let suffixes = vec![
            (".svc".into(), "a cluster Service name".into()),
            (
                format!(".{domain}"),
                format!("a name under the cluster domain {domain}"),
            ),
        ];
        Self { exact, suffixes }
    }

    /// Why `host` (a registry host, alias or auth host, with an optional
    /// port) may not be claimed, or `None`.
    pub fn why(&self, host: &str) -> Option<&str> {
        let name = split_port(host)
            .0
            .trim_end_matches('.')
            .to_ascii_lowercase();
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
