//! The generated CRD installed into a real kube-apiserver (test bed): valid
//! MirrorRegistries are stored with their defaults and printer columns; what
//! the CEL rules forbid is rejected by the API server itself, with the
//! rule's message; the status subresource works.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use kube::Api;
use kube::api::PostParams;
use pullthrough_api::config::RegistryConfig;
use pullthrough_api::crd::{MirrorRegistry, MirrorRegistrySpec, NodeTargets, TagRuleSpec};
use pullthrough_operator::crd_yaml;
use pullthrough_testbed::Error;
use pullthrough_testbed::kube::{KubeApiserver, kubectl_row};
use serde_json::{Value, json};

fn manifest(name: &str, spec: Value) -> String {
    json!({
        "apiVersion": "pullthrough.dev/v1alpha1",
        "kind": "MirrorRegistry",
        "metadata": {"name": name},
        "spec": spec,
    })
    .to_string()
}

fn create(api: &KubeApiserver, name: &str, spec: Value) {
    api.kubectl_stdin(&["create", "-f", "-"], &manifest(name, spec.clone()))
        .unwrap_or_else(|e| panic!("{name} ({spec}) must be accepted: {e}"));
}

/// Creating `spec` fails, and the API server's answer contains `message`.
fn rejected(api: &KubeApiserver, name: &str, spec: Value, message: &str) {
    match api.kubectl_stdin(&["create", "-f", "-"], &manifest(name, spec.clone())) {
        Err(Error::Command { output, .. }) => {
            assert!(
                output.contains(&format!("The MirrorRegistry \"{name}\" is invalid"))
                    && output.contains(message),
                "{name} ({spec}): expected the API server to reject it with {message:?}, got:\n{output}"
            );
        }
        Ok(out) => panic!("{name} ({spec}) must be rejected with {message:?}, was created: {out}"),
        Err(e) => panic!("{name}: unexpected failure {e}"),
    }
}

fn get_json(api: &KubeApiserver, name: &str) -> Value {
    let out = api
        .kubectl(&["get", "mreg", name, "-o", "json"])
        .expect("get mreg");
    serde_json::from_str(&out).expect("JSON")
}

const SCHEME: &str = "without a scheme";
const LOWERCASE: &str = "must be lowercase";
const HOSTNAME: &str = "must be a host name or IP address";
const PORT: &str = "port must be between 1 and 65535";
const INSECURE: &str = "set allowInsecureUpstream: true";
const URL: &str = "must be an http:// or https:// URL";
const TTL: &str = "must be a duration from 0s to 168h (7 days)";
const POLICY_TTL: &str = "must be `immutable` or a duration from 0s to 168h";

#[test]
fn api_server_enforces_the_mirrorregistry_crd() {
    let api = KubeApiserver::start().expect("start etcd + kube-apiserver");
    let crd = crd_yaml().expect("render CRD");
    api.kubectl_stdin(&["apply", "-f", "-"], &crd)
        .expect("the API server accepts the generated CRD");
    api.kubectl(&[
        "wait",
        "--for=condition=established",
        "--timeout=60s",
        "crd/mirrorregistries.pullthrough.dev",
    ])
    .expect("CRD established");

    // --- accepted ---
    create(
        &api,
        "quay",
        json!({
            "host": "quay.io",
            "upstream": "https://quay.io",
            "aliases": ["quay-mirror.example"],
            "authHosts": ["auth.quay.example"],
            "tls": {"caBundleConfigMapRef": {"name": "quay-ca", "namespace": "pullthrough"}},
            "credentialsSecretRef": {"name": "quay-creds", "namespace": "pullthrough"},
            "tagTTL": "1h30m",
        }),
    );
    create(&api, "docker-hub", json!({"host": "docker.io"}));
    create(
        &api,
        "plain-http",
        json!({"host": "registry.lan:5000", "upstream": "http://10.0.0.5:5000", "allowInsecureUpstream": true}),
    );
    create(
        &api,
        "ipv6",
        json!({"host": "[fd00::1]:5000", "tagTTL": "0", "tls": {"insecureSkipVerify": true}}),
    );
    create(
        &api,
        "ttl-zero",
        json!({"host": "a.example", "tagTTL": "0s"}),
    );
    create(
        &api,
        "ttl-ms",
        json!({"host": "f.example", "tagTTL": "1m30s500ms"}),
    );
    create(
        &api,
        "ttl-max",
        json!({"host": "b.example", "tagTTL": "168h"}),
    );
    create(
        &api,
        "ttl-max-minutes",
        json!({"host": "c.example", "tagTTL": "10080m"}),
    );
    create(
        &api,
        "tag-policy",
        json!({"host": "g.example", "upstreamReserve": 0, "tagPolicy": [
            {"pattern": "latest|main|stable", "ttl": "0s"},
            {"pattern": "v?[0-9]+\\.[0-9]+\\.[0-9]+", "ttl": "immutable"},
            {"pattern": ".*-rc[0-9]*", "ttl": "168h"},
        ]}),
    );
    create(
        &api,
        "prefetch",
        json!({"host": "h.example", "prefetch": [
            "library/nginx:1.27",
            format!("org/app@sha256:{}", "a".repeat(64)),
            "a/b/c_d-e:v1.2.3-rc.1",
        ]}),
    );
    create(
        &api,
        "pem",
        json!({"host": "d.example", "tls": {"caBundle": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"}}),
    );

    // Explicit nulls mean "unset": the API server prunes them.
    create(
        &api,
        "nulls",
        json!({"host": "e.example", "upstream": null, "tagTTL": null, "tls": {"caBundle": null}, "credentialsSecretRef": null}),
    );
    let nulls = get_json(&api, "nulls")["spec"].clone();
    assert_eq!(
        nulls,
        json!({"host": "e.example", "tls": {"insecureSkipVerify": false},
               "private": false, "allowPush": false, "allowInsecureUpstream": false,
               "allowPrivateNetworks": false,
               "nodes": {"dnsHijack": true, "containerd": true, "crio": true}}),
    );

    // Defaults are applied by the API server.
    let hub = get_json(&api, "docker-hub");
    assert_eq!(
        hub["spec"]["nodes"],
        json!({"dnsHijack": true, "containerd": true, "crio": true}),
        "{hub}"
    );
    assert_eq!(hub["spec"]["private"], false);
    assert_eq!(hub["spec"]["allowInsecureUpstream"], false);
    let quay = get_json(&api, "quay");
    assert_eq!(
        quay["spec"]["tls"]["caBundleConfigMapRef"]["key"], "ca.crt",
        "{quay}"
    );

    // --- rejected by CEL, each with its rule's message ---
    rejected(&api, "scheme", json!({"host": "https://quay.io"}), SCHEME);
    rejected(&api, "upper", json!({"host": "Quay.io"}), LOWERCASE);
    rejected(&api, "space", json!({"host": "quay io"}), HOSTNAME);
    rejected(&api, "path", json!({"host": "quay.io/library"}), HOSTNAME);
    rejected(&api, "dash", json!({"host": "-quay.io"}), HOSTNAME);
    rejected(&api, "port-word", json!({"host": "quay.io:http"}), HOSTNAME);
    rejected(&api, "port-zero", json!({"host": "quay.io:0"}), PORT);
    rejected(&api, "port-big", json!({"host": "quay.io:70000"}), PORT);
    rejected(
        &api,
        "alias-upper",
        json!({"host": "quay.io", "aliases": ["Quay.io"]}),
        LOWERCASE,
    );
    rejected(
        &api,
        "authhost-scheme",
        json!({"host": "docker.io", "authHosts": ["https://auth.docker.io"]}),
        SCHEME,
    );
    // Issue #10, point 11: names the node itself depends on.
    for (name, spec) in [
        ("localhost", json!({"host": "localhost:5000"})),
        ("loopback", json!({"host": "127.0.0.1:5000"})),
        ("loopback6", json!({"host": "[::1]:5000"})),
        (
            "metadata-alias",
            json!({"host": "quay.io", "aliases": ["169.254.169.254"]}),
        ),
        (
            "linklocal-auth",
            json!({"host": "docker.io", "authHosts": ["[fe80::1]"]}),
        ),
        ("sub-localhost", json!({"host": "registry.localhost"})),
    ] {
        rejected(&api, name, spec, "must not be localhost or a loopback");
    }
    // A single name without a port is Docker Hub's in references: no pull
    // names such a registry. Token hosts are URL hosts: a single name is
    // fine there.
    let single = "a single name without a port is Docker Hub's";
    rejected(&api, "single-label", json!({"host": "harbor"}), single);
    rejected(
        &api,
        "single-label-alias",
        json!({"host": "harbor.example", "aliases": ["harbor"]}),
        single,
    );
    create(&api, "single-label-port", json!({"host": "harbor:5000"}));
    create(
        &api,
        "single-label-auth",
        json!({"host": "harbor.example", "authHosts": ["keycloak"]}),
    );
    rejected(
        &api,
        "alias-dup",
        json!({"host": "quay.io", "aliases": ["a.example", "a.example"]}),
        "Duplicate value",
    );
    rejected(
        &api,
        "http",
        json!({"host": "registry.lan", "upstream": "http://registry.lan"}),
        INSECURE,
    );
    rejected(
        &api,
        "http-upper",
        json!({"host": "registry.lan", "upstream": "HTTP://registry.lan"}),
        INSECURE,
    );
    rejected(
        &api,
        "http-false",
        json!({"host": "registry.lan", "upstream": "http://registry.lan", "allowInsecureUpstream": false}),
        INSECURE,
    );
    rejected(
        &api,
        "no-scheme",
        json!({"host": "quay.io", "upstream": "quay.io"}),
        URL,
    );
    rejected(
        &api,
        "ftp",
        json!({"host": "quay.io", "upstream": "ftp://quay.io"}),
        URL,
    );
    rejected(
        &api,
        "query",
        json!({"host": "quay.io", "upstream": "https://quay.io/?x=1"}),
        URL,
    );
    for (name, entry) in [
        ("prefetch-no-tag", "library/nginx"),
        ("prefetch-port", "quay.io:443/x:1"),
        ("prefetch-upper", "Library/nginx:1"),
        ("prefetch-short-digest", "nginx@sha256:abc"),
    ] {
        let spec = json!({"host": "quay.io", "prefetch": [entry]});
        rejected(&api, name, spec, "spec.prefetch[0]");
    }
    rejected(
        &api,
        "reserve-negative",
        json!({"host": "quay.io", "upstreamReserve": -1}),
        "spec.upstreamReserve",
    );
    rejected(
        &api,
        "policy-ttl-days",
        json!({"host": "quay.io", "tagPolicy": [{"pattern": "a", "ttl": "8d"}]}),
        POLICY_TTL,
    );
    rejected(
        &api,
        "policy-ttl-words",
        json!({"host": "quay.io", "tagPolicy": [{"pattern": "a", "ttl": "forever"}]}),
        POLICY_TTL,
    );
    rejected(
        &api,
        "policy-no-ttl",
        json!({"host": "quay.io", "tagPolicy": [{"pattern": "a"}]}),
        "ttl: Required value",
    );
    rejected(
        &api,
        "ttl-days",
        json!({"host": "quay.io", "tagTTL": "8d"}),
        TTL,
    );
    rejected(
        &api,
        "ttl-hours",
        json!({"host": "quay.io", "tagTTL": "200h"}),
        TTL,
    );
    rejected(
        &api,
        "ttl-just-over",
        json!({"host": "quay.io", "tagTTL": "167h61m"}),
        TTL,
    );
    rejected(
        &api,
        "ttl-negative",
        json!({"host": "quay.io", "tagTTL": "-1s"}),
        TTL,
    );
    rejected(
        &api,
        "ttl-words",
        json!({"host": "quay.io", "tagTTL": "soon"}),
        TTL,
    );
    rejected(
        &api,
        "ttl-unitless",
        json!({"host": "quay.io", "tagTTL": "10"}),
        TTL,
    );
    rejected(
        &api,
        "ttl-fraction",
        json!({"host": "quay.io", "tagTTL": "1.5h"}),
        TTL,
    );
    rejected(
        &api,
        "ca-both",
        json!({"host": "quay.io", "tls": {
            "caBundle": "-----BEGIN CERTIFICATE-----\n",
            "caBundleConfigMapRef": {"name": "x", "namespace": "y"},
        }}),
        "set caBundle or caBundleConfigMapRef, not both",
    );
    rejected(
        &api,
        "ca-path",
        json!({"host": "quay.io", "tls": {"caBundle": "/etc/ssl/ca.pem"}}),
        "must hold PEM certificates",
    );
    rejected(
        &api,
        "private-with-credentials",
        json!({"host": "quay.io", "private": true,
               "credentialsSecretRef": {"name": "x", "namespace": "y"}}),
        "credentialsSecretRef would never be used",
    );
    rejected(
        &api,
        "no-host",
        json!({"upstream": "https://quay.io"}),
        "spec.host: Required value",
    );

    // Updates are checked too: turning an accepted CR insecure is refused...
    let patched = api.kubectl(&[
        "patch",
        "mreg",
        "quay",
        "--type=merge",
        "-p",
        r#"{"spec":{"upstream":"http://quay.io"}}"#,
    ]);
    assert!(
        matches!(&patched, Err(Error::Command { output, .. }) if output.contains(INSECURE)),
        "an update to an http:// upstream must be rejected, got {patched:?}"
    );
    // ...and opting in at the same time is fine.
    api.kubectl(&[
        "patch",
        "mreg",
        "ttl-zero",
        "--type=merge",
        "-p",
        r#"{"spec":{"upstream":"http://a.example","allowInsecureUpstream":true}}"#,
    ])
    .expect("http:// upstream with allowInsecureUpstream");

    // --- printer columns and the status subresource ---
    let table = api.kubectl(&["get", "mreg"]).expect("kubectl get mreg");
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["NAME", "HOST", "UPSTREAM", "READY", "NODES", "AGE"],
        "{table}"
    );
    assert_eq!(
        kubectl_row(&table, "quay")[1..5],
        ["quay.io", "https://quay.io", "", ""],
        "{table}"
    );

    let status = json!({"status": {
        "observedGeneration": 1,
        "conditions": [
            {"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
             "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "ProxyReady", "status": "True", "reason": "TableServed",
             "message": "proxy serves table 0123abcd", "lastTransitionTime": "2026-01-01T00:00:00Z"},
        ],
        "nodes": {"configured": 3, "total": 3},
        "nodesSummary": "3/3",
        "cache": {"hits": 10, "misses": 2, "bytes": 123_456_789},
    }});
    api.kubectl(&[
        "patch",
        "mreg",
        "quay",
        "--subresource=status",
        "--type=merge",
        "-p",
        &status.to_string(),
    ])
    .expect("patch status");
    let table = api.kubectl(&["get", "mreg"]).expect("kubectl get mreg");
    assert_eq!(
        kubectl_row(&table, "quay")[1..5],
        ["quay.io", "https://quay.io", "True", "3/3"],
        "{table}"
    );
    assert_eq!(
        kubectl_row(&table, "plain-http")[2],
        "http://10.0.0.5:5000",
        "{table}"
    );
    assert_eq!(
        kubectl_row(&table, "nulls")[1..3],
        ["e.example", ""],
        "{table}"
    );

    // conditions is a list-map keyed by type: one entry per type.
    let dup = json!({"status": {"conditions": [
        {"type": "Accepted", "status": "True", "reason": "A", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"},
        {"type": "Accepted", "status": "False", "reason": "B", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"},
    ]}});
    let dup = api.kubectl(&[
        "patch",
        "mreg",
        "docker-hub",
        "--subresource=status",
        "--type=merge",
        "-p",
        &dup.to_string(),
    ]);
    assert!(
        matches!(&dup, Err(Error::Command { output, .. }) if output.contains("Duplicate value")),
        "two conditions of one type must be rejected, got {dup:?}"
    );
    // The main resource ignores status; the status subresource ignores spec.
    api.kubectl(&[
        "patch",
        "mreg",
        "docker-hub",
        "--type=merge",
        "-p",
        r#"{"status":{"nodesSummary":"9/9"}}"#,
    ])
    .expect("patch main resource");
    assert!(get_json(&api, "docker-hub").get("status").is_none());

    // The Rust types read what the API server stored, and build from it
    // the registry table entries; and what they write is accepted.
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async {
        let client = api.client().await.expect("kube client");
        let mregs: Api<MirrorRegistry> = Api::all(client);
        let quay = mregs.get("quay").await.expect("get quay");
        let status = quay.status.as_ref().expect("status");
        assert_eq!(status.nodes_summary.as_deref(), Some("3/3"));
        assert_eq!(
            status
                .condition(pullthrough_api::crd::condition::PROXY_READY)
                .map(|c| c.status.as_str()),
            Some("True")
        );
        assert_eq!(status.cache.map(|c| c.bytes), Some(123_456_789));
        let table = RegistryConfig::try_from(&quay.spec).expect("quay converts");
        assert_eq!(table.tag_ttl, std::time::Duration::from_secs(5400));
        assert_eq!(table.aliases, ["quay-mirror.example"]);

        for name in [
            "docker-hub",
            "plain-http",
            "ipv6",
            "ttl-zero",
            "ttl-max",
            "ttl-max-minutes",
            "ttl-ms",
            "pem",
            "nulls",
        ] {
            let mreg = mregs.get(name).await.expect("get");
            RegistryConfig::try_from(&mreg.spec).unwrap_or_else(|e| {
                panic!("{name}: accepted by the API server but not convertible: {e}")
            });
        }

        let spec = MirrorRegistrySpec {
            host: "ghcr.io".into(),
            upstream: None,
            aliases: vec![],
            auth_hosts: vec![],
            tls: None,
            credentials_secret_ref: None,
            tag_ttl: Some("5m".into()),
            tag_policy: vec![TagRuleSpec {
                pattern: "latest".into(),
                ttl: "0s".into(),
            }],
            upstream_reserve: Some(20),
            prefetch: vec!["org/tool:1".into()],
            private: false,
            allow_push: true,
            allow_insecure_upstream: false,
            allow_private_networks: false,
            nodes: NodeTargets {
                dns_hijack: false,
                ..NodeTargets::default()
            },
        };
        let created = mregs
            .create(
                &PostParams::default(),
                &MirrorRegistry::new("ghcr", spec.clone()),
            )
            .await
            .expect("a MirrorRegistry built in Rust is accepted");
        assert_eq!(created.spec, spec);
    });
}
