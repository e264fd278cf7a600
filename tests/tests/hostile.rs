//! Hostile input against the cluster side: each test plays an attacker with
//! the credentials that attacker would really hold, against the real API
//! server and the chart's own objects, and asserts the attack is refused.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use pullthrough_testbed::kube::KubeApiserver;

const NS: &str = "pullthrough";
const AGENT_SA: &str = "pullthrough-agent";

fn lease(name: &str) -> String {
    lease_held_by(name, name, "")
}

/// A Lease `name` held by `holder`, with `registries` as the agent's
/// report annotation.
fn lease_held_by(name: &str, holder: &str, registries: &str) -> String {
    format!(
        "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {{name: {name}, namespace: {NS}, \
         annotations: {{pullthrough.dev/registries: '{registries}'}}}}\n\
         spec: {{holderIdentity: {holder}, leaseDurationSeconds: 90}}\n"
    )
}

/// Issue #10, point 12: RBAC lets the agent's ServiceAccount write every
/// Lease in the namespace; the chart's ValidatingAdmissionPolicy must hold
/// each agent to its own node's Lease, with the token a real agent Pod gets.
#[test]
fn an_agent_token_writes_only_its_own_nodes_lease() {
    let api = KubeApiserver::start().unwrap();
    api.kubectl(&["create", "namespace", NS]).unwrap();
    // The chart's ServiceAccounts, RBAC and the agents' Lease policy.
    api.apply_chart_access("pullthrough", NS).unwrap();
    let node_a = api
        .kubeconfig_for_token(&api.pod_token_on_node(NS, AGENT_SA, "node-a").unwrap())
        .unwrap();
    api.pod_token_on_node(NS, AGENT_SA, "node-b").unwrap();
    // The operator's leader Lease and node-b's Lease already exist: the
    // attacker on node-a tries to overwrite them.
    api.kubectl_stdin(
        &["apply", "-f", "-"],
        &format!(
            "{}---\n{}",
            lease("pullthrough-operator"),
            lease("pullthrough-agent-node-b")
        ),
    )
    .unwrap();

    let unbound = api
        .kubeconfig_for_token(&api.token_for(NS, AGENT_SA).unwrap())
        .unwrap();
    let as_agent = |kubeconfig: &Path, args: &[&str], input: &str| {
        let mut all = vec!["--kubeconfig", kubeconfig.to_str().unwrap()];
        all.extend_from_slice(args);
        api.kubectl_stdin(&all, input)
    };

    // Enforced once the API server's admission informer has the policy.
    api.wait_until_refused(
        &node_a,
        &lease("pullthrough-agent-node-c"),
        "may write only its own Lease",
        Duration::from_secs(30),
    )
    .unwrap();

    // Its own Lease: create, then update, as the agent does.
    as_agent(
        &node_a,
        &["create", "-f", "-"],
        &lease("pullthrough-agent-node-a"),
    )
    .expect("node-a creates its own Lease");
    as_agent(
        &node_a,
        &["replace", "-f", "-"],
        &lease_held_by("pullthrough-agent-node-a", "node-a", "quay.io"),
    )
    .expect("node-a updates its own Lease");

    // Everything else is refused, with a message that says why.
    let refused = |what: &str, r: pullthrough_testbed::Result<String>, says: &str| {
        let e = r.expect_err(what).to_string();
        assert!(e.contains(says), "{what}: {e}");
    };
    refused(
        "node-a overwrites node-b's report",
        as_agent(
            &node_a,
            &["replace", "-f", "-"],
            &lease_held_by("pullthrough-agent-node-b", "node-b", "forged"),
        ),
        "may write only its own Lease pullthrough-agent-node-a",
    );
    refused(
        "node-a takes the operator's leader Lease",
        as_agent(
            &node_a,
            &["replace", "-f", "-"],
            &lease_held_by("pullthrough-operator", "node-a", ""),
        ),
        "not pullthrough-operator",
    );
    // The agent never patches: RBAC does not let it, not even its own.
    refused(
        "node-a patches its own Lease",
        as_agent(
            &node_a,
            &[
                "annotate",
                "--overwrite",
                "lease",
                "-n",
                NS,
                "pullthrough-agent-node-a",
                "pullthrough.dev/registries=patched",
            ],
            "",
        ),
        "cannot patch resource \"leases\"",
    );
    refused(
        "node-a creates a Lease for a node that does not exist",
        as_agent(
            &node_a,
            &["create", "-f", "-"],
            &lease("pullthrough-agent-node-c"),
        ),
        "may write only its own Lease",
    );
    refused(
        "a token bound to no Pod writes a Lease",
        as_agent(
            &unbound,
            &["create", "-f", "-"],
            &lease("pullthrough-agent-node-z"),
        ),
        "names no node",
    );
    refused(
        "a token bound to no Pod writes the Lease whose name it guesses",
        as_agent(
            &unbound,
            &["replace", "-f", "-"],
            &lease_held_by("pullthrough-agent-node-a", "node-a", "forged"),
        ),
        "names no node",
    );

    // Nothing forged landed.
    let registries = |name: &str| {
        api.kubectl(&[
            "get",
            "lease",
            "-n",
            NS,
            name,
            "-o",
            "jsonpath={.metadata.annotations.pullthrough\\.dev/registries}",
        ])
        .unwrap()
    };
    assert_eq!(registries("pullthrough-agent-node-a"), "quay.io");
    assert_eq!(registries("pullthrough-agent-node-b"), "");
    let holder = api
        .kubectl(&[
            "get",
            "lease",
            "-n",
            NS,
            "pullthrough-operator",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
        .unwrap();
    assert_eq!(holder, "pullthrough-operator");
    assert!(
        api.kubectl(&["get", "lease", "-n", NS, "pullthrough-agent-node-c"])
            .is_err(),
        "no Lease for node-c"
    );
}
