//! Benchmark (a printed figure, not a timed assertion): 1000 MirrorRegistries
//! created against the test bed's real kube-apiserver → seconds until the
//! registry table lists all of them, and until every one is Accepted.
//! Run: `cargo test -p pullthrough-operator --test bench_table -- --nocapture`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use kube::Api;
use kube::api::{ListParams, PostParams};
use pullthrough_api::config::ProxyConfig;
use pullthrough_api::crd::{MirrorRegistry, MirrorRegistrySpec};
use pullthrough_testbed::kube::KubeApiserver;
use pullthrough_testbed::net::free_port;
use pullthrough_testbed::process::Process;

const N: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_registries_converge() {
    let api = tokio::task::spawn_blocking(KubeApiserver::start)
        .await
        .unwrap()
        .expect("test bed kube-apiserver");
    api.apply_crds(&pullthrough_operator::crd_yaml().unwrap())
        .unwrap();
    api.create_service_account("pullthrough", "pullthrough-operator")
        .unwrap();
    let rbac = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/rbac/operator-rbac.yaml"
    ))
    .unwrap();
    api.kubectl_stdin(&["apply", "-f", "-"], &rbac).unwrap();
    let token = api
        .token_for("pullthrough", "pullthrough-operator")
        .unwrap();
    let kubeconfig = api.kubeconfig_for_token(&token).unwrap();

    let port = free_port().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pullthrough-operator"));
    cmd.env("KUBECONFIG", &kubeconfig)
        .args(["--namespace", "pullthrough", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .args(["--proxy-status-url", "http://127.0.0.1:1/status"]);
    let mut op =
        Process::spawn("pullthrough-operator", cmd, api.dir().join("operator.log")).unwrap();

    let client = api.client().await.unwrap();
    let mregs: Api<MirrorRegistry> = Api::all(client.clone());
    let start = Instant::now();
    futures::stream::iter(0..N)
        .map(|i| {
            let mregs = mregs.clone();
            async move {
                let spec = MirrorRegistrySpec {
                    host: format!("registry-{i:04}.example"),
                    ..serde_json::from_value(serde_json::json!({"host": "x"})).unwrap()
                };
                mregs
                    .create(
                        &PostParams::default(),
                        &MirrorRegistry::new(&format!("r{i:04}"), spec),
                    )
                    .await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<_>>()
        .await
        .unwrap();
    let created = start.elapsed();

    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), "pullthrough");
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let n = cms
            .get_opt("pullthrough-registries")
            .await
            .unwrap()
            .and_then(|cm| cm.data?.get("config.yaml").cloned())
            .map(|y| ProxyConfig::from_yaml(&y).unwrap().registries.len())
            .unwrap_or(0);
        if n == N {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "table has {n}/{N}; log:\n{}",
            op.log_tail(3000)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let table = start.elapsed();
    loop {
        let accepted = mregs
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|m| {
                m.status
                    .as_ref()
                    .and_then(|s| s.condition("Accepted"))
                    .is_some_and(|c| c.status == "True")
            })
            .count();
        if accepted == N {
            break;
        }
        assert!(Instant::now() < deadline, "{accepted}/{N} accepted");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let statuses = start.elapsed();
    println!(
        "BENCH {N} MirrorRegistries: created in {:.2} s; table converged at {:.2} s; all Accepted at {:.2} s",
        created.as_secs_f64(),
        table.as_secs_f64(),
        statuses.as_secs_f64()
    );
    op.stop().unwrap();
}
