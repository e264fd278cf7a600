//! What a reconcile reads about the cluster besides MirrorRegistries: the
//! proxy Service (the table's `proxy:` section), the agents' Leases (node
//! counts) and the proxy's `/status`, cached briefly for all reconciles.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use pullthrough_api::agent::NodeProxy;

use crate::context::Settings;
use crate::error::{Error, KubeContext};
use crate::nodes::{self, AgentReport};
use crate::proxy_status::{self, ProxyStatus};

/// A burst of 1000 reconciles shares one observation instead of making
/// 1000 LISTs; a second is short enough that status stays current.
const TTL: Duration = Duration::from_secs(1);
/// How long the proxy gets to answer `GET /status`.
const PROXY_STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// The cluster as last observed.
#[derive(Debug, Clone)]
pub struct Observed {
    pub node_proxy: Option<NodeProxy>,
    pub reports: Vec<AgentReport>,
    /// The error is the `ProxyUnreachable` condition message.
    pub proxy: Result<ProxyStatus, String>,
}

/// The last observation, shared by reconciles, with the moments it began
/// and ended.
#[derive(Default)]
pub struct Observer {
    last: tokio::sync::Mutex<Option<(Instant, Instant, Observed)>>,
    /// The proxy listed only public tag moves although the operator sent
    /// its admin token (warned once per change, not per reconcile).
    token_refused: AtomicBool,
}

impl Observer {
    /// Warns when the proxy does not take the admin token the operator
    /// has: `TagMoved` Events would quietly cover public repositories only.
    fn check_token_taken(&self, sent: bool, status: &ProxyStatus) {
        let refused = sent && status.tag_moves_scope.as_deref() == Some("public");
        if self.token_refused.swap(refused, Ordering::Relaxed) != refused {
            if refused {
                tracing::warn!(
                    "the proxy did not take PULLTHROUGH_ADMIN_TOKEN (not its adminToken): \
                     TagMoved Events cover public repositories only"
                );
            } else {
                tracing::info!("the proxy takes the admin token again");
            }
        }
    }

    /// The cluster as observed at most [`TTL`] ago (`fresh`: now).
    pub async fn observe(
        &self,
        client: &Client,
        settings: &Settings,
        base: Option<&NodeProxy>,
        fresh: bool,
    ) -> Result<Observed, Error> {
        let asked = Instant::now();
        let mut cached = self.last.lock().await;
        // A fresh observation is one begun after the ask: callers queued
        // behind one that was (deletions polling while the proxy does not
        // answer, 2 s each) share it instead of each taking their own.
        if let Some((began, ended, o)) = cached.as_ref()
            && (*began >= asked || (!fresh && ended.elapsed() < TTL))
        {
            return Ok(o.clone());
        }
        let began = Instant::now();
        let ns = &settings.namespace;
        let services: Api<Service> = Api::namespaced(client.clone(), ns);
        // Without the Service the base config's `proxy:` still makes a
        // usable table; a missing Service must not stop reconciles. A
        // Service that could not be read is another matter: taken as
        // missing, a passing API error would rewrite every node's proxy
        // address and re-issue the CA for the changed names, and flip it
        // all back a moment later. The reconcile fails and is retried.
        let service = services
            .get_opt(&settings.proxy_service)
            .await
            .context(|| format!("reading the proxy Service {ns}/{}", settings.proxy_service))?;
        let (node_proxy, admin) = node_proxy(settings, base, service.as_ref());
        let leases: Api<Lease> = Api::namespaced(client.clone(), ns);
        let leases = leases
            .list(&ListParams::default())
            .await
            .context(|| format!("listing Leases in {ns}"))?
            .items;
        let mut reports = nodes::reports(&leases, &settings.agent_lease_prefix, Timestamp::now());
        // An expired report from a node that no longer exists is history,
        // not a node waiting to be configured. Nodes are listed only then:
        // in a healthy cluster every report is live.
        if reports.iter().any(|r| !r.live) {
            let node_api: Api<Node> = Api::all(client.clone());
            match node_api.list_metadata(&ListParams::default()).await {
                Ok(list) => {
                    let existing: HashSet<String> =
                        list.items.iter().map(|n| n.name_any()).collect();
                    nodes::drop_departed(&mut reports, &existing);
                }
                Err(e) => tracing::warn!(error = %e, "listing Nodes; counting every agent Lease"),
            }
        }
        let url = settings.proxy_status_url.clone().or(admin);
        let proxy = match url {
            Some(url) => {
                let token = settings.proxy_admin_token.as_ref();
                let status = proxy_status::fetch(&url, token, PROXY_STATUS_TIMEOUT).await;
                if let Ok(s) = &status {
                    self.check_token_taken(token.is_some(), s);
                }
                status
            }
            None => Err(format!(
                "proxy Service {ns}/{} not found and no --proxy-status-url",
                settings.proxy_service
            )),
        };
        let o = Observed {
            node_proxy,
            reports,
            proxy,
        };
        *cached = Some((began, Instant::now(), o.clone()));
        Ok(o)
    }
}

/// The table's `proxy:` section from the Service (the base config's section
/// as defaults), and the default `/status` URL.
pub fn node_proxy(
    settings: &Settings,
    base: Option<&NodeProxy>,
    svc: Option<&Service>,
) -> (Option<NodeProxy>, Option<String>) {
    let base = base.cloned();
    let Some(spec) = svc.and_then(|s| s.spec.as_ref()) else {
        return (base, None);
    };
    let Some(ip) = spec
        .cluster_ip
        .clone()
        .filter(|ip| !ip.is_empty() && ip != "None")
    else {
        return (base, None);
    };
    let port = |name: &str| {
        spec.ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .and_then(|p| u16::try_from(p.port).ok())
    };
    let mut np = base.unwrap_or(NodeProxy {
        address: String::new(),
        https_port: 443,
        http_port: None,
        ready_url: None,
        ca_file: None,
        never_hijack: Vec::new(),
    });
    np.address = ip;
    if let Some(p) = port("https") {
        np.https_port = p;
    }
    np.http_port = port("http").or(np.http_port);
    np.ca_file = Some(settings.node_ca_file.clone());
    let host = np.host_for_url();
    let admin = port("admin");
    if let Some(a) = admin {
        np.ready_url = Some(format!("http://{host}:{a}/readyz"));
    }
    (Some(np), admin.map(|a| format!("http://{host}:{a}/status")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::path::PathBuf;

    pub(super) fn settings() -> Settings {
        Settings {
            namespace: "ns".into(),
            table_configmap: "t".into(),
            table_mount_path: PathBuf::from("/t"),
            credentials_secret: "c".into(),
            credentials_mount_path: PathBuf::from("/c"),
            proxy_service: "proxy".into(),
            node_ca_file: PathBuf::from("/ca.crt"),
            proxy_status_url: None,
            proxy_admin_token: None,
            agent_lease_prefix: "a-".into(),
            delete_timeout: Duration::from_secs(1),
            resync_interval: Duration::from_secs(1),
            cluster_domain: "cluster.local".into(),
            api_server_host: None,
            reserved_hosts: Vec::new(),
        }
    }

    fn service(ip: &str, ports: &[(&str, i32)]) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "proxy"},
            "spec": {
                "clusterIP": ip,
                "ports": ports.iter().map(|(n, p)| serde_json::json!({"name": n, "port": p}))
                    .collect::<Vec<_>>(),
            },
        }))
        .unwrap()
    }

    #[test]
    fn service_ports_fill_the_proxy_section() {
        let svc = service(
            "fd00::10",
            &[("https", 8443), ("http", 80), ("admin", 9090)],
        );
        let (np, status) = node_proxy(&settings(), None, Some(&svc));
        let np = np.unwrap();
        assert_eq!((np.address.as_str(), np.https_port), ("fd00::10", 8443));
        assert_eq!(np.http_port, Some(80));
        assert_eq!(np.ca_file, Some(PathBuf::from("/ca.crt")));
        assert_eq!(
            np.ready_url.as_deref(),
            Some("http://[fd00::10]:9090/readyz")
        );
        assert_eq!(status.as_deref(), Some("http://[fd00::10]:9090/status"));
    }

    #[test]
    fn headless_or_missing_service_keeps_the_base_section() {
        let base = NodeProxy {
            address: "10.0.0.1".into(),
            https_port: 443,
            http_port: None,
            ready_url: None,
            ca_file: None,
            never_hijack: vec!["internal.example".into()],
        };
        let headless = service("None", &[("https", 443)]);
        for svc in [None, Some(&headless)] {
            let (np, status) = node_proxy(&settings(), Some(&base), svc);
            assert_eq!(np.as_ref(), Some(&base));
            assert_eq!(status, None);
        }
        let svc = service("10.96.0.5", &[]);
        let np = node_proxy(&settings(), Some(&base), Some(&svc)).0.unwrap();
        assert_eq!(np.address, "10.96.0.5");
        assert_eq!(np.never_hijack, base.never_hijack);
    }
}

#[cfg(test)]
mod sharing {
    #![allow(clippy::unwrap_used)]
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    type Req = http::Request<kube::client::Body>;
    type Resp = http::Response<kube::client::Body>;

    fn json(code: u16, v: serde_json::Value) -> Resp {
        http::Response::builder()
            .status(code)
            .header("content-type", "application/json")
            .body(kube::client::Body::from(serde_json::to_vec(&v).unwrap()))
            .unwrap()
    }

    /// Deletions poll with fresh observations every 2 s; with a proxy that
    /// takes connections and never answers, each observation takes the
    /// whole 2 s `/status` timeout, and ten of them queued one behind
    /// another (20 s) held up every other reconcile. Asked together, they
    /// now share: at most two observations for ten callers.
    #[tokio::test]
    async fn fresh_observations_asked_together_are_shared() {
        // Accepted by the kernel, never answered.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut s = super::tests::settings();
        s.proxy_status_url = Some(format!("http://{}/status", silent.local_addr().unwrap()));
        let (svc, mut handle) = tower_test::mock::pair::<Req, Resp>();
        let client = Client::new(svc, "default");
        let lists = Arc::new(AtomicUsize::new(0));
        let server = {
            let lists = Arc::clone(&lists);
            tokio::spawn(async move {
                while let Some((req, send)) = handle.next_request().await {
                    let resp = if req.uri().path().ends_with("/leases") {
                        lists.fetch_add(1, Ordering::SeqCst);
                        json(
                            200,
                            serde_json::json!({"kind": "LeaseList",
                                "apiVersion": "coordination.k8s.io/v1", "metadata": {}, "items": []}),
                        )
                    } else {
                        json(
                            404,
                            serde_json::json!({"kind": "Status", "apiVersion": "v1",
                                "status": "Failure", "reason": "NotFound", "code": 404}),
                        )
                    };
                    send.send_response(resp);
                }
            })
        };
        let observer = Arc::new(Observer::default());
        let started = Instant::now();
        let calls: Vec<_> = (0..10)
            .map(|_| {
                let (o, c, s) = (Arc::clone(&observer), client.clone(), s.clone());
                tokio::spawn(async move { o.observe(&c, &s, None, true).await })
            })
            .collect();
        for call in calls {
            let o = call.await.unwrap().unwrap();
            assert!(o.proxy.is_err(), "the silent proxy answered");
        }
        server.abort();
        let n = lists.load(Ordering::SeqCst);
        assert!(n <= 2, "{n} observations for 10 callers");
        assert!(
            started.elapsed() < 3 * PROXY_STATUS_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
    }
}
