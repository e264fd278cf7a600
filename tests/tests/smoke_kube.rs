//! Smoke test of the Kubernetes part of the test bed: a real etcd and
//! kube-apiserver on loopback, CRDs, RBAC with ServiceAccount tokens, helm,
//! kubeconform and kube::Client. Each piece must really work: every check
//! fails if the component behind it is broken.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use pullthrough_testbed::Error;
use pullthrough_testbed::kube::KubeApiserver;
use pullthrough_testbed::net::assert_loopback;

const WIDGET_CRD: &str = r#"
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata:
  name: widgets.smoke.pullthrough.dev
spec:
  group: smoke.pullthrough.dev
  scope: Cluster
  names:
    plural: widgets
    singular: widget
    kind: Widget
    listKind: WidgetList
  versions:
    - name: v1
      served: true
      storage: true
      schema:
        openAPIV3Schema:
          type: object
          properties:
            spec:
              type: object
              properties:
                size:
                  type: integer
              required: [size]
"#;

const WIDGET: &str = r#"
apiVersion: smoke.pullthrough.dev/v1
kind: Widget
metadata:
  name: first-widget
spec:
  size: 3
"#;

const WIDGET_READER: &str = r#"
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: widget-reader
rules:
  - apiGroups: [smoke.pullthrough.dev]
    resources: [widgets]
    verbs: [get, list]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: widget-reader
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: widget-reader
subjects:
  - kind: ServiceAccount
    name: reader
    namespace: smoke
"#;

#[test]
fn apiserver_crd_rbac_token_helm_kubeconform() {
    let api = KubeApiserver::start().expect("start etcd + kube-apiserver");
    assert_loopback(api.addr()).expect("API server on loopback");
    assert!(api.etcd().client_url().starts_with("http://127.0.0.1:"));

    // A CRD, established, with a custom resource listed back.
    api.kubectl_stdin(&["apply", "-f", "-"], WIDGET_CRD)
        .expect("apply CRD");
    api.kubectl(&[
        "wait",
        "--for=condition=established",
        "--timeout=60s",
        "crd/widgets.smoke.pullthrough.dev",
    ])
    .expect("CRD established");
    api.kubectl_stdin(&["apply", "-f", "-"], WIDGET)
        .expect("create Widget");
    let names = api
        .kubectl(&["get", "widgets", "-o", "name"])
        .expect("list widgets");
    assert_eq!(names.trim(), "widget.smoke.pullthrough.dev/first-widget");
    // The schema is enforced (proves this is a real API server).
    let bad = api.kubectl_stdin(
        &["apply", "-f", "-"],
        "apiVersion: smoke.pullthrough.dev/v1\nkind: Widget\nmetadata: {name: bad}\nspec: {}\n",
    );
    assert!(
        matches!(&bad, Err(Error::Command { output, .. }) if output.contains("spec.size")),
        "a Widget without spec.size must be rejected, got {bad:?}"
    );

    // A ServiceAccount token authenticates, and RBAC decides.
    api.create_service_account("smoke", "reader")
        .expect("create ServiceAccount");
    let token = api.token_for("smoke", "reader").expect("TokenRequest");
    let as_reader = api.kubeconfig_for_token(&token).expect("token kubeconfig");
    let denied = api.kubectl_with(&as_reader, &["get", "widgets", "-o", "name"]);
    match &denied {
        Err(Error::Command { output, .. }) => assert!(
            output.contains("Forbidden") && output.contains("system:serviceaccount:smoke:reader"),
            "expected Forbidden for the ServiceAccount, got: {output}"
        ),
        other => panic!("listing widgets without RBAC must fail, got {other:?}"),
    }
    // A made-up token is not a ServiceAccount at all.
    let forged = api
        .kubeconfig_for_token("not-a-real-token")
        .expect("forged kubeconfig");
    let unauth = api.kubectl_with(&forged, &["get", "widgets"]);
    assert!(
        matches!(&unauth, Err(Error::Command { output, .. }) if output.contains("Unauthorized")),
        "a forged token must be Unauthorized, got {unauth:?}"
    );
    api.kubectl_stdin(&["apply", "-f", "-"], WIDGET_READER)
        .expect("bind widget-reader");
    // RBAC changes reach the authorizer through an informer: poll briefly.
    let mut last = None;
    pullthrough_testbed::net::wait_for(
        "widget-reader binding to take effect",
        std::time::Duration::from_secs(30),
        || {
            let r = api.kubectl_with(&as_reader, &["get", "widgets", "-o", "name"]);
            let ok = r.is_ok();
            last = Some(r);
            Ok(ok)
        },
    )
    .unwrap_or_else(|e| panic!("{e}; last attempt: {last:?}"));
    let listed = last.expect("an attempt").expect("list as reader");
    assert_eq!(listed.trim(), "widget.smoke.pullthrough.dev/first-widget");
    // ...and nothing beyond the role: namespaces stay forbidden.
    let ns = api.kubectl_with(&as_reader, &["get", "namespaces"]);
    assert!(
        matches!(&ns, Err(Error::Command { output, .. }) if output.contains("Forbidden")),
        "reader must not list namespaces, got {ns:?}"
    );

    // helm and kubeconform are present and work offline.
    let helm = api.helm().expect("helm");
    let version = helm.run(&["version", "--short"]).expect("helm version");
    assert!(version.starts_with("v3."), "helm version: {version}");
    let kubeconform = api
        .kubeconform_with(&[("smoke.pullthrough.dev/v1", "Widget")])
        .expect("kubeconform schemas");
    let v = kubeconform.run(&["-v"], "").expect("kubeconform -v");
    assert!(v.trim().starts_with('v'), "kubeconform -v: {v}");

    let charts = tempfile::tempdir().expect("temp dir");
    let chart = write_chart(charts.path());
    helm.run(&["lint", "--strict", chart.to_str().expect("utf-8 path")])
        .expect("helm lint --strict");
    let rendered = helm
        .run(&[
            "template",
            "smoke",
            chart.to_str().expect("utf-8 path"),
            "--namespace",
            "smoke",
        ])
        .expect("helm template");
    let summary = kubeconform
        .run(&["-strict", "-summary"], &rendered)
        .expect("kubeconform validates the rendered chart");
    assert!(
        summary.contains("Valid: 5")
            && summary.contains("Invalid: 0")
            && summary.contains("Skipped: 0"),
        "kubeconform summary: {summary}"
    );
    // The schemas are real and strict: an unknown field and a wrong type fail.
    let typo = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndatta: {a: b}\n";
    let rejected = kubeconform.run(&["-strict"], typo);
    assert!(
        matches!(&rejected, Err(Error::Command { output, .. })
            if output.contains("additional properties 'datta' not allowed")),
        "kubeconform must reject an unknown ConfigMap field, got {rejected:?}"
    );
    let bad_widget = "apiVersion: smoke.pullthrough.dev/v1\nkind: Widget\nmetadata: {name: w}\nspec: {size: big}\n";
    let rejected = kubeconform.run(&["-strict"], bad_widget);
    assert!(
        matches!(&rejected, Err(Error::Command { output, .. }) if output.contains("/spec/size")),
        "kubeconform must check the CRD's schema, got {rejected:?}"
    );

    // The chart installs into the real API server.
    helm.run(&[
        "install",
        "smoke",
        chart.to_str().expect("utf-8 path"),
        "--namespace",
        "smoke",
        "--wait=false",
    ])
    .expect("helm install");
    let cm = api
        .kubectl(&[
            "get",
            "configmap",
            "smoke-config",
            "-n",
            "smoke",
            "-o",
            "jsonpath={.data.greeting}",
        ])
        .expect("installed ConfigMap");
    assert_eq!(cm, "hello");
}

/// A tiny chart: a ConfigMap, a ServiceAccount, a Widget, and a Deployment
/// and Service using the field types real charts use (quantities,
/// int-or-string ports, empty maps).
fn write_chart(dir: &Path) -> std::path::PathBuf {
    let chart = dir.join("smoke");
    std::fs::create_dir_all(chart.join("templates")).expect("mkdir chart");
    let files = [
        (
            "Chart.yaml",
            "apiVersion: v2\nname: smoke\ndescription: Test bed smoke chart\nversion: 0.1.0\nicon: https://example.invalid/icon.png\n",
        ),
        (
            "values.yaml",
            "# Greeting stored in the ConfigMap.\ngreeting: hello\n",
        ),
        (
            "templates/configmap.yaml",
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-config\n  labels:\n    app.kubernetes.io/name: {{ .Chart.Name }}\ndata:\n  greeting: {{ .Values.greeting | quote }}\n",
        ),
        (
            "templates/serviceaccount.yaml",
            "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: {{ .Release.Name }}\n  namespace: {{ .Release.Namespace }}\n",
        ),
        (
            "templates/widget.yaml",
            "apiVersion: smoke.pullthrough.dev/v1\nkind: Widget\nmetadata:\n  name: {{ .Release.Name }}-widget\nspec:\n  size: 1\n",
        ),
        ("templates/deployment.yaml", DEPLOYMENT_TEMPLATE),
        ("templates/service.yaml", SERVICE_TEMPLATE),
    ];
    for (name, text) in files {
        std::fs::write(chart.join(name), text).expect("write chart file");
    }
    chart
}

const DEPLOYMENT_TEMPLATE: &str = r#"apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}
  annotations: {}
spec:
  replicas: 1
  selector:
    matchLabels:
      app: {{ .Release.Name }}
  strategy:
    rollingUpdate:
      maxUnavailable: 0
      maxSurge: 25%
  template:
    metadata:
      labels:
        app: {{ .Release.Name }}
    spec:
      serviceAccountName: {{ .Release.Name }}
      securityContext:
        runAsNonRoot: true
      containers:
        - name: app
          image: "registry.invalid/smoke:1"
          args: ["--listen=:8080"]
          ports:
            - name: http
              containerPort: 8080
          readinessProbe:
            httpGet:
              path: /readyz
              port: http
          livenessProbe:
            tcpSocket:
              port: 8080
          resources:
            requests:
              cpu: 100m
              memory: 64Mi
            limits:
              cpu: 1
              memory: 128Mi
          volumeMounts:
            - name: config
              mountPath: /etc/smoke
      volumes:
        - name: config
          configMap:
            name: {{ .Release.Name }}-config
"#;

const SERVICE_TEMPLATE: &str = r#"apiVersion: v1
kind: Service
metadata:
  name: {{ .Release.Name }}
spec:
  selector:
    app: {{ .Release.Name }}
  ports:
    - name: http
      port: 80
      targetPort: http
    - name: metrics
      port: 9090
      targetPort: 9090
"#;

#[tokio::test(flavor = "multi_thread")]
async fn kube_client_lists_namespaces() {
    use k8s_openapi::api::core::v1::Namespace;
    use kube::api::{Api, ListParams};

    let api = tokio::task::spawn_blocking(KubeApiserver::start)
        .await
        .expect("join")
        .expect("start etcd + kube-apiserver");
    api.create_service_account("client-smoke", "default")
        .expect("namespace");
    let client = api.client().await.expect("kube client");
    let names: Vec<String> = Api::<Namespace>::all(client)
        .list(&ListParams::default())
        .await
        .expect("list namespaces")
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    assert!(
        names.iter().any(|n| n == "client-smoke"),
        "namespaces: {names:?}"
    );
    tokio::task::spawn_blocking(move || drop(api))
        .await
        .expect("stop");
}
