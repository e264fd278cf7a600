//! `rbac/operator-rbac.yaml` grants the operator what its code uses and
//! no more (`tests/reconcile_apiserver.rs` runs it with exactly these
//! rules, so what it needs is there): no verb the code never calls, and
//! the objects of fixed names only by name.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;

use serde::Deserialize;
use serde_json::Value;

/// Every (role, apiGroup, resource, verb, resourceName or "*") granted.
fn grants() -> BTreeSet<(String, String, String, String, String)> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/rbac/operator-rbac.yaml"
    ))
    .unwrap();
    let mut out = BTreeSet::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let v = Value::deserialize(doc).unwrap();
        if v["kind"] != "Role" && v["kind"] != "ClusterRole" {
            continue;
        }
        let role = format!(
            "{}/{}",
            v["metadata"]["namespace"].as_str().unwrap_or(""),
            v["metadata"]["name"].as_str().unwrap()
        );
        let strs = |x: &Value| -> Vec<String> {
            x.as_array()
                .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
                .unwrap_or_default()
        };
        for rule in v["rules"].as_array().unwrap() {
            let names = match strs(&rule["resourceNames"]) {
                n if n.is_empty() => vec!["*".to_string()],
                n => n,
            };
            for g in strs(&rule["apiGroups"]) {
                for r in strs(&rule["resources"]) {
                    for verb in strs(&rule["verbs"]) {
                        for n in &names {
                            out.insert((
                                role.clone(),
                                g.clone(),
                                r.clone(),
                                verb.clone(),
                                n.clone(),
                            ));
                        }
                    }
                }
            }
        }
    }
    out
}

#[test]
fn the_operator_is_granted_only_the_verbs_it_uses() {
    let g = grants();
    let granted = |group: &str, resource: &str, verb: &str| {
        g.iter()
            .filter(|(_, gr, r, v, _)| gr == group && r == resource && v == verb)
            .map(|(_, _, _, _, n)| n.as_str())
            .collect::<Vec<_>>()
    };
    // Never called: ConfigMaps are only read (references) and applied by
    // name; Leases got and replaced; Events are events.k8s.io ones.
    for (group, resource, verb) in [
        ("", "configmaps", "list"),
        ("", "configmaps", "watch"),
        ("", "configmaps", "update"),
        ("coordination.k8s.io", "leases", "watch"),
        ("coordination.k8s.io", "leases", "patch"),
        ("", "events", "create"),
        ("", "events", "patch"),
        ("pullthrough.dev", "discoveredregistries", "get"),
        ("pullthrough.dev", "discoveredregistries", "watch"),
        ("pullthrough.dev", "discoveredregistries", "update"),
        ("pullthrough.dev", "mirrorregistries", "update"),
        ("", "nodes", "get"),
    ] {
        assert!(
            granted(group, resource, verb).is_empty(),
            "{group}/{resource} {verb} is granted but never used"
        );
    }
    // Written objects of fixed names: by name.
    for (group, resource, verb, names) in [
        (
            "",
            "configmaps",
            "patch",
            &[
                "pullthrough-ca",
                "pullthrough-pins",
                "pullthrough-registries",
            ][..],
        ),
        (
            "",
            "configmaps",
            "create",
            &[
                "pullthrough-ca",
                "pullthrough-pins",
                "pullthrough-registries",
            ][..],
        ),
        (
            "coordination.k8s.io",
            "leases",
            "update",
            &["pullthrough-operator"][..],
        ),
        ("", "services", "get", &["pullthrough-proxy"][..]),
    ] {
        assert_eq!(
            granted(group, resource, verb),
            names,
            "{group}/{resource} {verb}"
        );
    }
}
