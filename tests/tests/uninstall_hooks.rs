//! The chart's post-delete hook that deletes the DiscoveredRegistries,
//! run as its own ServiceAccount against a real API server: it waits until
//! the operator's pods are gone (a pod still terminating may have a write
//! in flight that would recreate a report after it), and it does not wait
//! when there are none.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pullthrough_testbed::kube::{KubeApiserver, yaml_documents};
use pullthrough_testbed::tools::go_tool;

const NS: &str = "pullthrough";
const HOOK: &str = "templates/discovered-cleanup-hook.yaml";
const HOOK_NAME: &str = "pullthrough-discovered-cleanup";

/// The hook's Job, as rendered.
fn hook_job(api: &KubeApiserver) -> serde_json::Value {
    let chart = pullthrough_testbed::kube::workspace_dir()
        .unwrap()
        .join("charts/pullthrough");
    let yaml = api
        .helm()
        .unwrap()
        .run(&[
            "template",
            "pullthrough",
            chart.to_str().unwrap(),
            "--namespace",
            NS,
            "--show-only",
            HOOK,
        ])
        .unwrap();
    yaml_documents(&yaml)
        .unwrap()
        .into_iter()
        .find(|d| d["kind"] == "Job")
        .expect("the hook's Job")
}

/// `kubectl ARGS` as the hook's ServiceAccount.
fn as_hook(api: &KubeApiserver, args: &[String]) -> Command {
    let kubeconfig = api
        .kubeconfig_for_token(&api.token_for(NS, HOOK_NAME).unwrap())
        .unwrap();
    let mut cmd = Command::new(go_tool("kubectl").unwrap());
    cmd.arg(format!("--kubeconfig={}", kubeconfig.display()))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// The args of the Job's container `name` (init or main).
fn container_args(job: &serde_json::Value, name: &str) -> Vec<String> {
    let spec = &job["spec"]["template"]["spec"];
    let containers = spec["initContainers"]
        .as_array()
        .into_iter()
        .chain(spec["containers"].as_array())
        .flatten();
    let c = containers
        .into_iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name} in {job:#}"));
    assert_eq!(c["command"], serde_json::json!(["kubectl"]), "{c:#}");
    c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// Waits (at most `limit`) for `child` to exit; its status and output.
fn exited(mut child: Child, limit: Duration) -> (bool, String) {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            return (status.success(), text);
        }
        if start.elapsed() > limit {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_discovered_cleanup_waits_until_the_operators_pods_are_gone() {
    let api = KubeApiserver::start().expect("test bed kube-apiserver");
    api.apply_crds(&pullthrough_testbed::kube::chart_crds().unwrap())
        .unwrap();
    // The namespace, with the ServiceAccount pods get by default (no
    // controller-manager here to make it).
    api.create_service_account(NS, "default").unwrap();
    // Every identity the chart makes, the hook's among them (Helm
    // creates the hook's before its Job).
    api.apply_chart_access("pullthrough", NS).unwrap();
    let job = hook_job(&api);
    let wait_args = container_args(&job, "wait-for-operator");
    let delete_args = container_args(&job, "delete");

    // A report, and an operator pod that is terminating (a finalizer holds
    // it, as its grace period would) — and one of another release, which
    // the hook must not wait for.
    api.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: pullthrough.dev/v1alpha1\nkind: DiscoveredRegistry\n\
         metadata: {name: ghcr.io}\nspec: {host: ghcr.io}\n",
    )
    .unwrap();
    let pod = |name: &str, instance: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {NS}\n  \
             finalizers: [pullthrough.dev/test-hold]\n  labels:\n    \
             app.kubernetes.io/name: pullthrough\n    app.kubernetes.io/instance: {instance}\n    \
             app.kubernetes.io/component: operator\n\
             spec:\n  containers: [{{name: op, image: op}}]\n"
        )
    };
    api.kubectl_stdin(&["apply", "-f", "-"], &pod("operator-0", "pullthrough"))
        .unwrap();
    api.kubectl_stdin(&["apply", "-f", "-"], &pod("other-0", "other"))
        .unwrap();
    api.kubectl(&["delete", "pod", "operator-0", "-n", NS, "--wait=false"])
        .unwrap();

    let mut waiting = as_hook(&api, &wait_args).spawn().unwrap();
    // While the pod is there the hook waits: give it time to have
    // returned if it did not.
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "the wait returned while the operator's pod was terminating"
    );
    assert!(
        api.kubectl(&["get", "discoveredregistry", "ghcr.io"])
            .is_ok(),
        "the report went before the operator"
    );
    // The pod goes: the wait ends, successfully.
    api.kubectl(&[
        "patch",
        "pod",
        "operator-0",
        "-n",
        NS,
        "--type=merge",
        "-p",
        r#"{"metadata": {"finalizers": null}}"#,
    ])
    .unwrap();
    let (ok, out) = exited(waiting, Duration::from_secs(30));
    assert!(ok, "the wait failed: {out}");

    // No operator pod at all (the usual case): no wait, no failure.
    let (ok, out) = exited(
        as_hook(&api, &wait_args).spawn().unwrap(),
        Duration::from_secs(30),
    );
    assert!(ok, "with no operator pod the wait failed: {out}");

    // Then the reports go.
    let (ok, out) = exited(
        as_hook(&api, &delete_args).spawn().unwrap(),
        Duration::from_secs(30),
    );
    assert!(ok, "the delete failed: {out}");
    let left = api
        .kubectl(&["get", "discoveredregistries", "-o", "name"])
        .unwrap();
    assert!(left.trim().is_empty(), "reports left: {left}");
    // The other release's pod was never waited for, nor touched.
    assert!(api.kubectl(&["get", "pod", "other-0", "-n", NS]).is_ok());
}
