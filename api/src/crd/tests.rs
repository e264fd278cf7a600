use super::*;
use crate::config::{ConfigError, RegistryConfig};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

fn spec(yaml: &str) -> MirrorRegistrySpec {
    serde_norway::from_str(yaml).unwrap()
}

fn convert(yaml: &str) -> Result<RegistryConfig, ConfigError> {
    RegistryConfig::try_from(&spec(yaml))
}

#[test]
fn names_match_the_derive() {
    use kube::Resource;
    assert_eq!(MirrorRegistry::group(&()), GROUP);
    assert_eq!(MirrorRegistry::version(&()), VERSION);
    assert_eq!(MirrorRegistry::plural(&()), "mirrorregistries");
}

#[test]
fn go_durations() {
    let ok = [
        ("0", 0),
        ("0s", 0),
        ("10m", 600_000),
        ("1h30m", 5_400_000),
        ("90s", 90_000),
        ("1m30s500ms", 90_500),
        ("168h", 604_800_000),
        ("2h2h", 14_400_000),
    ];
    for (s, ms) in ok {
        assert_eq!(parse_go_duration(s), Ok(Duration::from_millis(ms)), "{s}");
    }
    assert_eq!(parse_go_duration("5us"), Ok(Duration::from_micros(5)));
    assert_eq!(parse_go_duration("7ns"), Ok(Duration::from_nanos(7)));
    for bad in [
        "", "10", "8d", "1.5h", "-1s", "+1s", "h", "1hm", "1 h", "soon", "1H", "00",
    ] {
        assert!(parse_go_duration(bad).is_err(), "{bad}");
    }
    // Overflow is an error, not a panic.
    assert!(parse_go_duration("99999999999999999999h").is_err());
    assert!(parse_go_duration("5000000000h").is_err());
}

/// Issue #10, point 11: a MirrorRegistry cannot take over a name the
/// node itself depends on, under any of its name fields or spellings
/// (the CRD's CEL rule only catches the common spellings).
#[test]
fn names_the_node_depends_on_are_refused() {
    for (yaml, key) in [
        ("host: localhost:5000", "spec.host"),
        ("host: '[0:0:0:0:0:0:0:1]:5000'", "spec.host"),
        (
            "host: quay.io\naliases: [quay.example, 169.254.169.254]",
            "spec.aliases[1]",
        ),
        (
            "host: docker.io\nauthHosts: ['[::ffff:127.0.0.1]']",
            "spec.authHosts[0]",
        ),
    ] {
        let e = convert(yaml).unwrap_err();
        assert_eq!(e.key, key, "{yaml}: {e}");
        assert!(e.message.contains("may not be mirrored"), "{e}");
    }
    assert!(convert("host: registry.lan:5000\naliases: [10.0.0.5:5000]").is_ok());
}

#[test]
fn full_spec_converts_to_a_registry_table_entry() {
    let s = spec(
        r#"
host: quay.io
upstream: https://quay.io/
aliases: [quay-mirror.example]
authHosts: [auth.quay.example]
tls:
  caBundleConfigMapRef: {name: quay-ca, namespace: pullthrough}
  insecureSkipVerify: true
credentialsSecretRef: {name: quay-creds, namespace: pullthrough}
tagTTL: 1h30m
private: true
allowPush: true
nodes: {dnsHijack: false}
"#,
    );
    assert_eq!(
        s.tls
            .as_ref()
            .unwrap()
            .ca_bundle_config_map_ref
            .as_ref()
            .unwrap()
            .key,
        "ca.crt"
    );
    assert_eq!(
        s.nodes,
        NodeTargets {
            dns_hijack: false,
            containerd: true,
            crio: true
        }
    );
    let r = RegistryConfig::try_from(&s).unwrap();
    assert_eq!(r.host, "quay.io");
    assert_eq!(r.upstream.as_deref(), Some("https://quay.io"));
    assert_eq!(r.aliases, ["quay-mirror.example"]);
    assert_eq!(r.auth_hosts, ["auth.quay.example"]);
    assert!(r.insecure_skip_verify);
    assert!(r.allow_push);
    assert_eq!(r.tag_ttl, Duration::from_secs(5400));
    assert!(!r.nodes.dns_hijack && r.nodes.containerd && r.nodes.crio);
    // File paths the proxy reads: the operator sets them when it
    // publishes the PEM and the credentials (operator/src/table.rs).
    assert_eq!(r.ca_bundle, None);
    assert_eq!(r.credentials_file, None);
}

#[test]
fn defaults() {
    let r = convert("host: ghcr.io\n").unwrap();
    assert_eq!(r.upstream.as_deref(), Some("https://ghcr.io"));
    assert_eq!(r.tag_ttl, crate::config::default_tag_ttl());
    assert!(!r.allow_push && !r.insecure_skip_verify);
    assert!(!r.allow_private_networks);
    assert!(r.nodes.is_default());
    let r = convert("host: lab.io\nallowPrivateNetworks: true\n").unwrap();
    assert!(r.allow_private_networks);
    // docker.io means Docker Hub, whose API lives elsewhere.
    let r = convert("host: docker.io\n").unwrap();
    assert_eq!(r.upstream.as_deref(), Some(DOCKER_HUB_UPSTREAM));
    assert_eq!(
        convert("tagTTL: 0s\nhost: a.io\n").unwrap().tag_ttl,
        Duration::ZERO
    );
    let r = convert(
        "host: a.io\ntagPolicy:\n- {pattern: latest, ttl: 0s}\n- {pattern: 'v.*', ttl: immutable}\n- {pattern: '.*-rc', ttl: 1h30m}\n",
    )
    .unwrap();
    let ttls: Vec<TagTtl> = r.tag_policy.iter().map(|t| t.ttl).collect();
    assert_eq!(
        ttls,
        [
            TagTtl::After(Duration::ZERO),
            TagTtl::Immutable,
            TagTtl::After(Duration::from_secs(5400))
        ]
    );
    assert_eq!(r.tag_policy[1].pattern, "v.*");
    assert!(r.tag_policy().unwrap().ttl("v1") == TagTtl::Immutable);
    assert_eq!(r.upstream_reserve, 10, "default reserve");
    let r = convert("host: a.io\nupstreamReserve: 0\n").unwrap();
    assert_eq!(r.upstream_reserve, 0);
}

#[test]
fn invalid_specs_name_the_key() {
    let key = |yaml: &str| convert(yaml).unwrap_err().key;
    assert_eq!(key("host: https://quay.io\n"), "spec.host");
    assert_eq!(key("host: Quay.io\n"), "spec.host");
    assert_eq!(key("host: quay.io:0\n"), "spec.host");
    assert_eq!(key("host: quay.io\naliases: [A.io]\n"), "spec.aliases[0]");
    assert_eq!(key("host: quay.io\naliases: [quay.io]\n"), "spec.host");
    assert_eq!(
        key("host: quay.io\nauthHosts: ['x y']\n"),
        "spec.authHosts[0]"
    );
    // Objects the API server admitted before the CRD said so.
    assert_eq!(key("host: harbor\n"), "spec.host");
    assert_eq!(
        key("host: harbor.lan\naliases: [harbor]\n"),
        "spec.aliases[0]"
    );
    assert!(convert("host: harbor:5000\nauthHosts: [keycloak]\n").is_ok());
    assert_eq!(key("host: quay.io\nupstream: quay.io\n"), "spec.upstream");
    assert_eq!(key("host: quay.io\ntagTTL: 8d\n"), "spec.tagTTL");
    assert_eq!(key("host: quay.io\ntagTTL: 169h\n"), "spec.tagTTL");
    let policy = |rules: &str| format!("host: quay.io\ntagPolicy:\n{rules}");
    assert_eq!(
        key(&policy(
            "- {pattern: a, ttl: 1m}\n- {pattern: b, ttl: 8d}\n"
        )),
        "spec.tagPolicy[1]"
    );
    assert_eq!(
        key(&policy("- {pattern: a, ttl: forever}\n")),
        "spec.tagPolicy[0]"
    );
    // The pattern is compiled by the proxy's own check.
    assert_eq!(
        key(&policy("- {pattern: '[', ttl: 1m}\n")),
        "spec.tagPolicy[0]"
    );
    let e = convert("host: lan.io\nupstream: http://lan.io\n").unwrap_err();
    assert_eq!(e.key, "spec.upstream");
    assert!(e.message.contains("allowInsecureUpstream"), "{e}");
    assert!(convert("host: lan.io\nupstream: HTTP://lan.io\n").is_err());
    let r = convert("host: lan.io\nupstream: http://lan.io\nallowInsecureUpstream: true\n");
    assert_eq!(r.unwrap().upstream.as_deref(), Some("http://lan.io"));
}

/// A referenced name the API server could not hold never reaches a
/// request (kube-rs does not encode it): InvalidSpec, naming the field.
#[test]
fn malformed_reference_names_are_invalid() {
    let secret = |name: &str, ns: &str| {
        format!("host: quay.io\ncredentialsSecretRef: {{name: '{name}', namespace: '{ns}'}}\n")
    };
    let config_map = |name: &str, ns: &str| {
        format!(
            "host: quay.io\ntls: {{caBundleConfigMapRef: {{name: '{name}', namespace: '{ns}'}}}}\n"
        )
    };
    // What the CRD admits (pattern and maxLength): the same verdicts.
    let name_re = regex::Regex::new(schema::OBJECT_NAME_PATTERN).unwrap();
    let ns_re = regex::Regex::new(schema::NAMESPACE_PATTERN).unwrap();
    let admitted = |name: &str, ns: &str| {
        name_re.is_match(name) && name.len() <= 253 && ns_re.is_match(ns) && ns.len() <= 63
    };
    let long_label = "a".repeat(64);
    for (name, ns, field) in [
        ("a b", "pullthrough", "name"),
        ("..", "pullthrough", "name"),
        (".", "pullthrough", "name"),
        ("a/b", "pullthrough", "name"),
        ("Creds", "pullthrough", "name"),
        ("-creds", "pullthrough", "name"),
        ("a..b", "pullthrough", "name"),
        (&"a".repeat(254), "pullthrough", "name"),
        ("creds", "a b", "namespace"),
        ("creds", "..", "namespace"),
        ("creds", "team.a", "namespace"),
        ("creds", &long_label, "namespace"),
    ] {
        assert!(!admitted(name, ns), "{name:?} {ns:?}");
        let e = convert(&secret(name, ns)).unwrap_err();
        assert_eq!(
            e.key,
            format!("spec.credentialsSecretRef.{field}"),
            "{name:?} {ns:?}: {e}"
        );
        let e = convert(&config_map(name, ns)).unwrap_err();
        assert_eq!(
            e.key,
            format!("spec.tls.caBundleConfigMapRef.{field}"),
            "{name:?} {ns:?}: {e}"
        );
    }
    for (name, ns) in [
        ("creds", "pullthrough"),
        ("my.creds-1", "team-a"),
        (&"a".repeat(253), &"b".repeat(63)),
    ] {
        assert!(admitted(name, ns), "{name:?} {ns:?}");
        assert!(convert(&secret(name, ns)).is_ok(), "{name:?} {ns:?}");
        assert!(convert(&config_map(name, ns)).is_ok(), "{name:?} {ns:?}");
    }
}

/// The CRD refuses the same names at `kubectl apply`.
#[test]
fn reference_name_patterns_are_in_the_schema() {
    use kube::CustomResourceExt;
    let crd = serde_json::to_value(MirrorRegistry::crd()).unwrap();
    let props = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"];
    for r in [
        &props["credentialsSecretRef"]["properties"],
        &props["tls"]["properties"]["caBundleConfigMapRef"]["properties"],
    ] {
        assert_eq!(r["name"]["pattern"], schema::OBJECT_NAME_PATTERN, "{r}");
        assert_eq!(r["namespace"]["pattern"], schema::NAMESPACE_PATTERN, "{r}");
    }
}

#[test]
fn spec_round_trips_without_unset_fields() {
    let s = spec("host: quay.io\nprivate: true\n");
    let yaml = serde_norway::to_string(&s).unwrap();
    assert_eq!(spec(&yaml), s);
    assert!(!yaml.contains("upstream"), "{yaml}");
}

#[test]
fn status_helpers() {
    let counts = NodeCounts {
        configured: 2,
        total: 3,
    };
    assert_eq!(counts.summary(), "2/3");
    let status = MirrorRegistryStatus {
        conditions: vec![Condition {
            type_: condition::PROXY_READY.into(),
            status: "True".into(),
            reason: "TableServed".into(),
            message: String::new(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                Default::default(),
            ),
            observed_generation: Some(1),
        }],
        ..Default::default()
    };
    assert_eq!(
        status.condition("ProxyReady").map(|c| c.status.as_str()),
        Some("True")
    );
    assert!(status.condition(condition::ACCEPTED).is_none());
    let json = serde_json::to_value(&status).unwrap();
    assert!(
        json.get("nodes").is_none() && json.get("cache").is_none(),
        "{json}"
    );
}
