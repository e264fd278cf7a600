//! The CRD the chart and `deploy/` ship is exactly what the code generates,
//! and its schema changes only on purpose.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use kube::CustomResourceExt;
use pullthrough_api::crd::MirrorRegistry;
use pullthrough_operator::{CRD_DIRS, crd_files};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("operator/ has a parent")
        .to_path_buf()
}

#[test]
fn committed_crd_files_match_crdgen() {
    let generated = crd_files().expect("render CRDs");
    let mut stale = Vec::new();
    for dir in CRD_DIRS {
        for (file, yaml) in &generated {
            let path = workspace_root().join(dir).join(file);
            match std::fs::read_to_string(&path) {
                Ok(committed) if committed == *yaml => {}
                Ok(_) => stale.push(format!("{dir}/{file} differs from the generated CRD")),
                Err(e) => stale.push(format!("{dir}/{file}: {e}")),
            }
        }
    }
    assert!(
        stale.is_empty(),
        "{}\nRegenerate with:\n{}",
        stale.join("\n"),
        CRD_DIRS
            .iter()
            .map(|d| format!("  cargo run -p pullthrough-operator --bin crdgen -- --out-dir {d}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

const SCHEMA_SNAPSHOT: &str = "tests/snapshots/crd-schema.json";

/// Pins the served version (schema with CEL rules, printer columns,
/// subresources) and the names. A change here is an API change: review it,
/// then bless it with `UPDATE_SNAPSHOTS=1 cargo test -p pullthrough-operator --test crd_files`.
#[test]
fn crd_schema_snapshot() {
    schema_snapshot(MirrorRegistry::crd(), SCHEMA_SNAPSHOT);
}

#[test]
fn discovered_registry_schema_snapshot() {
    schema_snapshot(
        pullthrough_api::discovered::DiscoveredRegistry::crd(),
        "tests/snapshots/crd-schema-discoveredregistries.json",
    );
}

fn schema_snapshot(
    crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    snapshot: &str,
) {
    let pinned = serde_json::json!({
        "names": crd.spec.names,
        "scope": crd.spec.scope,
        "versions": crd.spec.versions,
    });
    let rendered = serde_json::to_string_pretty(&pinned).unwrap() + "\n";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(snapshot);
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &rendered).expect("write snapshot");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    if committed != rendered {
        let first_diff = committed
            .lines()
            .zip(rendered.lines())
            .enumerate()
            .find(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| format!("line {}:\n  snapshot: {a}\n  code:     {b}", i + 1))
            .unwrap_or_else(|| "one is a prefix of the other".into());
        panic!(
            "the {} schema changed ({snapshot}); first difference at {first_diff}\n\
             If the change is intended, bless it with \
             `UPDATE_SNAPSHOTS=1 cargo test -p pullthrough-operator --test crd_files` \
             and regenerate the committed CRD files with crdgen.",
            crd.spec.names.kind
        );
    }
}

#[test]
fn crd_has_the_documented_shape() {
    let crd = MirrorRegistry::crd();
    assert_eq!(
        crd.metadata.name.as_deref(),
        Some("mirrorregistries.pullthrough.dev")
    );
    assert_eq!(crd.spec.group, "pullthrough.dev");
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(crd.spec.names.kind, "MirrorRegistry");
    assert_eq!(crd.spec.names.plural, "mirrorregistries");
    assert_eq!(crd.spec.names.short_names, Some(vec!["mreg".to_string()]));
    let v = &crd.spec.versions[0];
    assert_eq!(v.name, "v1alpha1");
    assert!(v.subresources.as_ref().unwrap().status.is_some());
    let columns: Vec<_> = v
        .additional_printer_columns
        .as_ref()
        .unwrap()
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(columns, ["Host", "Upstream", "Ready", "Nodes", "Age"]);

    let schema = serde_json::to_value(v.schema.as_ref().unwrap()).unwrap();
    let spec = &schema["openAPIV3Schema"]["properties"]["spec"];
    for field in [
        "host",
        "upstream",
        "aliases",
        "authHosts",
        "tls",
        "credentialsSecretRef",
        "tagTTL",
        "private",
        "allowPush",
        "allowInsecureUpstream",
        "nodes",
    ] {
        assert!(spec["properties"].get(field).is_some(), "spec.{field}");
    }
    for field in ["dnsHijack", "containerd", "crio"] {
        assert_eq!(
            spec["properties"]["nodes"]["properties"][field]["default"], true,
            "spec.nodes.{field} defaults to true"
        );
    }
    let conditions = &schema["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(
        conditions["x-kubernetes-list-map-keys"],
        serde_json::json!(["type"])
    );
    let rules = |v: &serde_json::Value| {
        v["x-kubernetes-validations"]
            .as_array()
            .map(|a| a.iter().map(|r| r["rule"].to_string()).collect::<String>())
            .unwrap_or_default()
    };
    assert!(rules(&spec["properties"]["host"]).contains("://"));
    assert!(rules(&spec["properties"]["tagTTL"]).contains("duration('168h')"));
    assert!(rules(spec).contains("allowInsecureUpstream"));
}
