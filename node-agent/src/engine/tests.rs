//! Engine tests against temp roots, with a recording executor.

use crate::runtime::DockerActionArg;
use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use proptest::prelude::*;
use pullthrough_api::config::ProxyConfig;

use super::*;
use crate::patch::containerd::CONFIG_TOML;
use crate::patch::crio::DROP_IN;
use crate::runtime::{RecordingExecutor, Rejected};

pub const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";

fn cfg(yaml: &str) -> AgentConfig {
    let table = ProxyConfig::from_yaml(yaml).unwrap();
    AgentConfig {
        proxy: table.proxy.clone().unwrap(),
        table,
        ca_pem: Some(PEM.as_bytes().to_vec()),
        sha256: "0".repeat(64),
    }
}

const CONFIG: &str = "
proxy: {address: 10.0.0.5, caFile: ca.crt}
registries:
  - {host: docker.io, upstream: 'https://registry-1.docker.io'}
  - {host: quay.io}
  - {host: ghcr.io}
";

fn opts(runtimes: &[RuntimeKind]) -> ApplyOptions {
    ApplyOptions {
        runtimes: Some(runtimes.to_vec()),
        docker_action: DockerActionArg::Auto,
        dry_run: false,
        migrate_containerd_mirrors: false,
        hosts_gate_closed: false,
    }
}

fn revert_opts() -> RevertOptions {
    RevertOptions {
        dry_run: false,
        reload_settle: Duration::ZERO,
    }
}

/// Every entry under the root: files with bytes and mode, dirs with mode.
pub fn snapshot(dir: &Path) -> BTreeMap<String, (Option<Vec<u8>>, u32)> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, (Option<Vec<u8>>, u32)>) {
        for e in fs::read_dir(dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            let m = fs::symlink_metadata(&p).unwrap();
            let mode = m.permissions().mode();
            if m.is_dir() {
                out.insert(rel, (None, mode));
                walk(base, &p, out);
            } else {
                out.insert(rel, (Some(fs::read(&p).unwrap()), mode));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

fn write(root: &Path, path: &str, bytes: &[u8]) {
    let p = root.join(path.trim_start_matches('/'));
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, bytes).unwrap();
}

fn read(root: &Path, path: &str) -> String {
    String::from_utf8(fs::read(root.join(path.trim_start_matches('/'))).unwrap()).unwrap()
}

fn run_apply(
    root: &Root,
    c: &AgentConfig,
    o: &ApplyOptions,
    exec: &mut RecordingExecutor,
) -> (Result<Report, AgentError>, String) {
    let mut out = Vec::new();
    let r = apply(root, c, o, exec, &mut out);
    (r, String::from_utf8(out).unwrap())
}

fn run_revert(root: &Root, exec: &mut RecordingExecutor) -> (Report, String) {
    let mut out = Vec::new();
    let r = revert(root, &revert_opts(), exec, &mut out).unwrap();
    (r, String::from_utf8(out).unwrap())
}

const DAEMON_JSON_ORIG: &str =
    "{\n\t\"log-driver\": \"json-file\",\n\t\"log-opts\": {\"max-size\": \"10m\"}\n}";
const HOSTS_ORIG: &str = "127.0.0.1\tlocalhost\r\n::1 localhost ip6-localhost # v6\r\n";

#[test]
fn docker_apply_is_idempotent_and_revert_restores_every_byte() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), HOSTS, HOSTS_ORIG.as_bytes());
    write(t.path(), DAEMON_JSON, DAEMON_JSON_ORIG.as_bytes());
    fs::set_permissions(
        t.path().join("etc/docker/daemon.json"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let before = snapshot(t.path());
    let root = Root::new(t.path());
    let c = cfg(CONFIG);
    let mut exec = RecordingExecutor::default();

    let (r, out) = run_apply(&root, &c, &opts(&[RuntimeKind::Docker]), &mut exec);
    let r = r.unwrap();
    assert_eq!(
        exec.calls,
        ["validate daemon.json", "reload docker"],
        "{out}"
    );
    assert!(out.contains("dockerd: reload (SIGHUP)"), "{out}");
    assert!(out.contains("updated   /etc/hosts"), "{out}");
    let hosts = read(t.path(), HOSTS);
    assert!(hosts.starts_with(HOSTS_ORIG));
    assert!(
        hosts.contains("10.0.0.5\tquay.io\r\n10.0.0.5\tghcr.io\r\n"),
        "{hosts}"
    );
    assert!(
        !hosts.contains("docker.io"),
        "Docker Hub goes through registry-mirrors"
    );
    let dj = read(t.path(), DAEMON_JSON);
    assert!(
        dj.starts_with("{\n\t\"log-driver\": \"json-file\",\n\t\"log-opts\": {"),
        "{dj}"
    );
    assert!(
        dj.contains("\"registry-mirrors\": [\n\t\t\"https://10.0.0.5\"\n\t]"),
        "{dj}"
    );
    assert_eq!(
        fs::metadata(t.path().join("etc/docker/daemon.json"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600,
        "mode kept"
    );
    for a in ["quay.io", "ghcr.io", "10.0.0.5"] {
        assert_eq!(
            read(
                t.path(),
                &format!("/etc/docker/certs.d/{a}/pullthrough-ca.crt")
            ),
            PEM
        );
    }
    assert_eq!(r.files.len(), 5, "{:?}", r.files);

    // Apply twice == apply once.
    let after_first = snapshot(t.path());
    let mut exec = RecordingExecutor::default();
    let (r, out) = run_apply(&root, &c, &opts(&[RuntimeKind::Docker]), &mut exec);
    assert!(r.unwrap().files.is_empty());
    assert_eq!(out.trim(), "no changes");
    assert!(
        exec.calls.iter().all(|c| !c.starts_with("reload")),
        "{:?}",
        exec.calls
    );
    assert_eq!(snapshot(t.path()), after_first);

    let st = status(&root).unwrap();
    assert!(st.files.iter().all(|f| f.state == "applied"), "{st:?}");
    assert_eq!(st.hosts_entries, ["10.0.0.5 quay.io", "10.0.0.5 ghcr.io"]);
    assert!(status_table(&st).contains("/etc/docker/daemon.json"));

    // Revert: registry-mirrors was created, so dockerd is first reloaded
    // with it emptied, then the original bytes come back.
    let mut exec = RecordingExecutor::default();
    let (_, out) = run_revert(&root, &mut exec);
    assert_eq!(exec.calls, ["reload docker"], "{out}");
    assert!(out.contains("clearing registry-mirrors"), "{out}");
    assert_eq!(snapshot(t.path()), before);
    assert!(!status(&root).unwrap().applied);
}

#[test]
fn dry_run_prints_diffs_and_writes_nothing() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), HOSTS, b"127.0.0.1 localhost\n");
    fs::create_dir_all(t.path().join("etc/docker")).unwrap();
    let before = snapshot(t.path());
    let root = Root::new(t.path());
    let mut o = opts(&[RuntimeKind::Docker]);
    o.dry_run = true;
    let mut exec = RecordingExecutor::default();
    let (r, out) = run_apply(&root, &cfg(CONFIG), &o, &mut exec);
    r.unwrap();
    assert!(out.contains("--- a/etc/hosts\n+++ b/etc/hosts"), "{out}");
    assert!(out.contains("+10.0.0.5\tquay.io"), "{out}");
    assert!(
        out.contains("--- /dev/null\n+++ b/etc/docker/daemon.json"),
        "{out}"
    );
    assert!(out.contains("dockerd: would reload"), "{out}");
    assert!(!exec.calls.iter().any(|c| c.starts_with("reload")));
    assert_eq!(snapshot(t.path()), before);
}

#[test]
fn invalid_daemon_json_is_refused_and_nothing_is_written() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), HOSTS, b"127.0.0.1 localhost\n");
    write(t.path(), DAEMON_JSON, b"{\"debug\": true,}\n");
    let before = snapshot(t.path());
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    let (r, _) = run_apply(
        &root,
        &cfg(CONFIG),
        &opts(&[RuntimeKind::Docker]),
        &mut exec,
    );
    let e = r.unwrap_err();
    assert!(
        e.to_string()
            .starts_with("/etc/docker/daemon.json: is not valid JSON"),
        "{e}"
    );
    assert_eq!(e.exit_code(), 1);
    assert_eq!(
        snapshot(t.path()),
        before,
        "not even /etc/hosts was touched"
    );
}

#[test]
fn dockerd_validate_rejection_stops_the_apply() {
    let t = tempfile::tempdir().unwrap();
    fs::create_dir_all(t.path().join("etc/docker")).unwrap();
    let before = snapshot(t.path());
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor {
        validation: Some(Err(Rejected("conflicting flag".into()))),
        ..Default::default()
    };
    let (r, _) = run_apply(
        &root,
        &cfg(CONFIG),
        &opts(&[RuntimeKind::Docker]),
        &mut exec,
    );
    assert!(r.unwrap_err().to_string().contains("dockerd --validate"));
    assert_eq!(snapshot(t.path()), before);
}

#[test]
fn admin_edits_after_apply_survive_revert() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), DAEMON_JSON, b"{\"debug\": true}\n");
    write(t.path(), HOSTS, b"127.0.0.1 localhost\n");
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    run_apply(
        &root,
        &cfg(CONFIG),
        &opts(&[RuntimeKind::Docker]),
        &mut exec,
    )
    .0
    .unwrap();
    // The admin adds a key and a hosts line after the agent.
    let mut dj: serde_json::Value = serde_json::from_str(&read(t.path(), DAEMON_JSON)).unwrap();
    dj["storage-driver"] = "overlay2".into();
    write(
        t.path(),
        DAEMON_JSON,
        serde_json::to_string(&dj).unwrap().as_bytes(),
    );
    let mut hosts = read(t.path(), HOSTS);
    hosts.push_str("192.168.1.9 nas\n");
    write(t.path(), HOSTS, hosts.as_bytes());
    let st = status(&root).unwrap();
    assert!(st.files.iter().any(|f| f.state == "changed since apply"));

    let mut exec = RecordingExecutor::default();
    let (_, out) = run_revert(&root, &mut exec);
    assert!(out.contains("changed since apply"), "{out}");
    let dj: serde_json::Value = serde_json::from_str(&read(t.path(), DAEMON_JSON)).unwrap();
    assert_eq!(
        dj,
        serde_json::json!({"debug": true, "storage-driver": "overlay2"})
    );
    assert_eq!(
        read(t.path(), HOSTS),
        "127.0.0.1 localhost\n192.168.1.9 nas\n"
    );
    assert!(!t.path().join("var/lib/pullthrough-agent").exists());
}

const CONTAINERD_V2: &str = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.k8s.io/pause:3.9\"\n";

/// The proxy moves: the admin's hosts.toml gets the new address first and
/// loses the old one; revert still gives every byte back.
#[test]
fn an_admins_hosts_toml_follows_the_proxy_to_a_new_address() {
    let quay = "/etc/containerd/certs.d/quay.io/hosts.toml";
    let (t, r, _) = containerd_apply_on(&[
        (
            CONFIG_TOML,
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
        ),
        (
            quay,
            "server = \"https://quay.io\"\n[host.\"https://mine\"]\n  capabilities = [\"pull\"]\n",
        ),
    ]);
    r.unwrap();
    let root = Root::new(t.path());
    let before = {
        let mut exec = RecordingExecutor::default();
        run_revert(&root, &mut exec);
        snapshot(t.path())
    };
    let mut exec = RecordingExecutor::default();
    run_apply(
        &root,
        &cfg(CONFIG),
        &opts(&[RuntimeKind::Containerd]),
        &mut exec,
    )
    .0
    .unwrap();
    let moved = CONFIG.replace("10.0.0.5", "10.0.0.6");
    let (r, out) = run_apply(
        &root,
        &cfg(&moved),
        &opts(&[RuntimeKind::Containerd]),
        &mut exec,
    );
    r.unwrap();
    let now = read(t.path(), quay);
    assert!(!now.contains("10.0.0.5"), "{out}\n{now}");
    let ours = now.find("[host.\"https://10.0.0.6\"]").unwrap();
    assert!(ours < now.find("[host.\"https://mine\"]").unwrap(), "{now}");
    let mut exec = RecordingExecutor::default();
    run_revert(&root, &mut exec);
    assert_eq!(snapshot(t.path()), before);
}

/// An admin who edits their hosts.toml after the apply keeps the edit on
/// revert: only the proxy host goes.
#[test]
fn an_admins_hosts_toml_edited_after_apply_loses_only_the_proxy_on_revert() {
    let quay = "/etc/containerd/certs.d/quay.io/hosts.toml";
    let admin =
        "server = \"https://quay.io\"\n[host.\"https://mine\"]\n  capabilities = [\"pull\"]\n";
    let (t, r, out) = containerd_apply_on(&[
        (
            CONFIG_TOML,
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
        ),
        (quay, admin),
    ]);
    r.unwrap();
    let applied = read(t.path(), quay);
    assert!(applied.contains("https://10.0.0.5"), "{out}");
    let edited = format!("{applied}[host.\"https://second\"]\n  capabilities = [\"pull\"]\n");
    write(t.path(), quay, edited.as_bytes());
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    let (_, out) = run_revert(&root, &mut exec);
    let left = read(t.path(), quay);
    assert!(!left.contains("10.0.0.5"), "{out}\n{left}");
    assert!(
        left.contains("https://mine") && left.contains("https://second"),
        "{left}"
    );
    assert!(
        !t.path()
            .join("etc/containerd/certs.d/quay.io/pullthrough-ca.crt")
            .exists()
    );
}

#[test]
fn containerd_gets_config_path_hosts_toml_and_one_restart() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), CONFIG_TOML, CONTAINERD_V2.as_bytes());
    // An admin's own hosts.toml for quay.io: the proxy goes first, their
    // host stays after it; revert gives the file back byte for byte.
    write(
        t.path(),
        "/etc/containerd/certs.d/quay.io/hosts.toml",
        b"server = \"https://quay.io\"\n[host.\"https://mine\"]\n  capabilities = [\"pull\"]\n",
    );
    let before = snapshot(t.path());
    let root = Root::new(t.path());
    let c = cfg(CONFIG);
    let mut exec = RecordingExecutor::default();
    let (r, out) = run_apply(&root, &c, &opts(&[RuntimeKind::Containerd]), &mut exec);
    r.unwrap();
    assert_eq!(exec.calls, ["restart containerd"], "{out}");
    assert!(read(t.path(), CONFIG_TOML).starts_with(CONTAINERD_V2));
    let quay = read(t.path(), "/etc/containerd/certs.d/quay.io/hosts.toml");
    assert!(quay.contains("server = \"https://quay.io\""), "{quay}");
    let ours = quay.find("[host.\"https://10.0.0.5\"]").expect(&quay);
    let theirs = quay.find("[host.\"https://mine\"]").expect(&quay);
    assert!(ours < theirs, "{quay}");
    assert!(!out.contains("replaced a hosts.toml"), "{out}");
    let hub = read(t.path(), "/etc/containerd/certs.d/docker.io/hosts.toml");
    assert!(
        hub.contains("server = \"https://registry-1.docker.io\""),
        "{hub}"
    );
    assert_eq!(
        read(
            t.path(),
            "/etc/containerd/certs.d/docker.io/pullthrough-ca.crt"
        ),
        PEM
    );

    // A new registry later: hosts.toml only, no restart.
    let c2 = cfg(&format!("{CONFIG}  - {{host: registry.k8s.io}}\n"));
    let mut exec = RecordingExecutor::default();
    let (r, out) = run_apply(&root, &c2, &opts(&[RuntimeKind::Containerd]), &mut exec);
    assert_eq!(r.unwrap().files.len(), 2, "{out}");
    assert!(exec.calls.is_empty(), "{:?}", exec.calls);
    assert!(
        out.contains("containerd: nothing to do (hosts.toml is re-read"),
        "{out}"
    );

    // And gone again: its directory goes too.
    let mut exec = RecordingExecutor::default();
    run_apply(&root, &c, &opts(&[RuntimeKind::Containerd]), &mut exec)
        .0
        .unwrap();
    assert!(
        !t.path()
            .join("etc/containerd/certs.d/registry.k8s.io")
            .exists()
    );

    let mut exec = RecordingExecutor::default();
    run_revert(&root, &mut exec);
    assert_eq!(snapshot(t.path()), before);
}

#[test]
fn containerd_mirrors_need_the_migrate_flag() {
    let t = tempfile::tempdir().unwrap();
    let conf = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://mirror.example\"]\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"mirror.only\"]\n  endpoint = [\"https://own.example\"]\n";
    write(t.path(), CONFIG_TOML, conf.as_bytes());
    let before = snapshot(t.path());
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    let (r, _) = run_apply(
        &root,
        &cfg(CONFIG),
        &opts(&[RuntimeKind::Containerd]),
        &mut exec,
    );
    let e = r.unwrap_err().to_string();
    assert!(
        e.starts_with("/etc/containerd/config.toml: uses the deprecated"),
        "{e}"
    );
    assert_eq!(snapshot(t.path()), before);

    let mut o = opts(&[RuntimeKind::Containerd]);
    o.migrate_containerd_mirrors = true;
    let (r, out) = run_apply(&root, &cfg(CONFIG), &o, &mut exec);
    r.unwrap();
    assert!(!read(t.path(), CONFIG_TOML).contains("mirrors"), "{out}");
    let hub = read(t.path(), "/etc/containerd/certs.d/docker.io/hosts.toml");
    let proxy_at = hub.find("https://10.0.0.5").unwrap();
    let mirror_at = hub.find("https://mirror.example").unwrap();
    assert!(
        proxy_at < mirror_at,
        "proxy first, then the admin's mirror: {hub}"
    );
    let own = read(t.path(), "/etc/containerd/certs.d/mirror.only/hosts.toml");
    // The run loop re-applies without the flag: the moved mirrors stay.
    let (r, out) = run_apply(
        &root,
        &cfg(CONFIG),
        &opts(&[RuntimeKind::Containerd]),
        &mut exec,
    );
    assert!(r.unwrap().files.is_empty(), "{out}");
    assert_eq!(
        read(t.path(), "/etc/containerd/certs.d/docker.io/hosts.toml"),
        hub
    );
    assert_eq!(
        read(t.path(), "/etc/containerd/certs.d/mirror.only/hosts.toml"),
        own
    );
    let mut exec = RecordingExecutor::default();
    run_revert(&root, &mut exec);
    assert_eq!(snapshot(t.path()), before);
}

#[test]
fn crio_drop_in_and_ca_then_revert() {
    let t = tempfile::tempdir().unwrap();
    write(
        t.path(),
        "/etc/containers/registries.conf",
        b"unqualified-search-registries = [\"docker.io\"]\n",
    );
    let before = snapshot(t.path());
    let root = Root::new(t.path());
    let c = cfg(
        "proxy: {address: 10.0.0.5, caFile: ca.crt, httpsPort: 5443}\nregistries: [{host: quay.io}]\n",
    );
    let mut exec = RecordingExecutor::default();
    let (r, out) = run_apply(
        &root,
        &c,
        &ApplyOptions {
            runtimes: None,
            ..opts(&[])
        },
        &mut exec,
    );
    r.unwrap();
    assert!(out.contains("crio: detected (/etc/containers)"), "{out}");
    assert_eq!(exec.calls, ["reload crio"]);
    let d = read(t.path(), DROP_IN);
    assert!(d.contains("location = \"10.0.0.5:5443/quay.io\""), "{d}");
    assert_eq!(
        read(
            t.path(),
            "/etc/containers/certs.d/10.0.0.5:5443/pullthrough-ca.crt"
        ),
        PEM
    );
    let mut exec = RecordingExecutor::default();
    run_revert(&root, &mut exec);
    assert_eq!(exec.calls, ["reload crio"]);
    assert_eq!(snapshot(t.path()), before);
}

#[test]
fn switching_runtimes_reverts_the_old_ones_files() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), HOSTS, b"127.0.0.1 localhost\n");
    let before = snapshot(t.path());
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    run_apply(
        &root,
        &cfg(CONFIG),
        &opts(&[RuntimeKind::Docker]),
        &mut exec,
    )
    .0
    .unwrap();
    let mut exec = RecordingExecutor::default();
    let (r, out) = run_apply(&root, &cfg(CONFIG), &opts(&[RuntimeKind::Crio]), &mut exec);
    r.unwrap();
    assert_eq!(read(t.path(), HOSTS), "127.0.0.1 localhost\n", "{out}");
    assert!(!t.path().join("etc/docker").exists(), "{out}");
    // registry-mirrors disappeared from dockerd's config: it is reloaded.
    assert!(
        exec.calls.contains(&"reload docker".to_string()),
        "{:?}",
        exec.calls
    );
    let mut exec = RecordingExecutor::default();
    run_revert(&root, &mut exec);
    assert_eq!(snapshot(t.path()), before);
}

#[test]
fn no_runtime_found_is_an_error() {
    let t = tempfile::tempdir().unwrap();
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    let (r, _) = run_apply(
        &root,
        &cfg(CONFIG),
        &ApplyOptions {
            runtimes: None,
            ..opts(&[])
        },
        &mut exec,
    );
    assert!(
        r.unwrap_err()
            .to_string()
            .contains("no container runtime found")
    );
    assert_eq!(fs::read_dir(t.path()).unwrap().count(), 0);
}

#[test]
fn revert_without_state_is_a_no_op() {
    let t = tempfile::tempdir().unwrap();
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    let (_, out) = run_revert(&root, &mut exec);
    assert!(out.contains("nothing to revert"));
    assert_eq!(fs::read_dir(t.path()).unwrap().count(), 0);
}

/// Foreign node files: a hosts file and daemon.json in assorted styles.
/// Optional contents of /etc/hosts, daemon.json and config.toml.
type NodeFiles = (Option<Vec<u8>>, Option<Vec<u8>>, Option<Vec<u8>>);

fn node_files() -> impl Strategy<Value = NodeFiles> {
    let hosts = prop::option::of(
        (
            prop::collection::vec(
                prop_oneof![
                    Just("127.0.0.1\tlocalhost".to_string()),
                    Just("::1 localhost ip6-loopback".to_string()),
                    "#[ -~]{0,20}",
                    "[ \t]{0,3}",
                    "10\\.[0-9]{1,3}\\.0\\.1[ \t]+[a-z]{1,8}",
                ],
                0..6,
            ),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(ls, crlf, nl)| {
                let eol = if crlf { "\r\n" } else { "\n" };
                let mut s = ls.join(eol);
                if nl && !s.is_empty() {
                    s.push_str(eol);
                }
                s.into_bytes()
            }),
    );
    let daemon = prop::option::of(prop_oneof![
        Just(b"{}".to_vec()),
        Just(b"\n".to_vec()),
        Just(br#"{"registry-mirrors":["https://m.example"],"debug":true}"#.to_vec()),
        Just(b"{\n    \"live-restore\": true,\n    \"insecure-registries\" : [ ]\n}\n".to_vec()),
        Just(b"{\r\n\t\"log-opts\": {\"b\": \"1\", \"a\": \"2\"}\r\n}".to_vec()),
    ]);
    let containerd = prop::option::of(prop_oneof![
        Just(CONTAINERD_V2.as_bytes().to_vec()),
        Just(b"version = 3\r\n# comment\r\n[plugins.'io.containerd.cri.v1.images']\r\n  snapshotter = 'overlayfs'".to_vec()),
        Just(b"version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n".to_vec()),
    ]);
    (hosts, daemon, containerd)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn apply_twice_then_revert_gives_back_the_exact_tree(
        (hosts, daemon, containerd) in node_files(),
        http_mode in any::<bool>(),
    ) {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("etc")).unwrap();
        if let Some(h) = &hosts { write(t.path(), HOSTS, h); }
        if let Some(d) = &daemon { write(t.path(), DAEMON_JSON, d); }
        if let Some(c) = &containerd { write(t.path(), CONFIG_TOML, c); }
        let before = snapshot(t.path());
        let root = Root::new(t.path());
        let mut c = cfg(if http_mode {
            "proxy: {address: 'fd00::5', httpPort: 80}\nregistries: [{host: docker.io}, {host: quay.io, authHosts: [auth.quay.io]}]\n"
        } else {
            CONFIG
        });
        if http_mode { c.ca_pem = None; }
        let all = opts(&RuntimeKind::ALL);
        let mut exec = RecordingExecutor::default();
        run_apply(&root, &c, &all, &mut exec).0.unwrap();
        let once = snapshot(t.path());
        let mut exec = RecordingExecutor::default();
        let (r, _) = run_apply(&root, &c, &all, &mut exec);
        prop_assert!(r.unwrap().files.is_empty());
        prop_assert_eq!(snapshot(t.path()), once);
        let mut exec = RecordingExecutor::default();
        run_revert(&root, &mut exec);
        prop_assert_eq!(snapshot(t.path()), before);
    }
}

#[test]
fn a_file_managed_again_after_an_admin_edit_reverts_to_that_edit() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), CONFIG_TOML, CONTAINERD_V2.as_bytes());
    let quay = "/etc/containerd/certs.d/quay.io/hosts.toml";
    let a = "server = \"https://quay.io\"\n# A\n";
    let b = "server = \"https://quay.io\"\n# B\n";
    write(t.path(), quay, a.as_bytes());
    let root = Root::new(t.path());
    let o = opts(&[RuntimeKind::Containerd]);
    let without_quay = "
proxy: {address: 10.0.0.5, caFile: ca.crt}
registries:
  - {host: docker.io, upstream: 'https://registry-1.docker.io'}
";
    let mut exec = RecordingExecutor::default();
    run_apply(&root, &cfg(CONFIG), &o, &mut exec).0.unwrap();
    // quay.io leaves the table: the admin's A comes back.
    run_apply(&root, &cfg(without_quay), &o, &mut exec)
        .0
        .unwrap();
    assert_eq!(read(t.path(), quay), a);
    // The admin edits it, then quay.io comes back.
    write(t.path(), quay, b.as_bytes());
    run_apply(&root, &cfg(CONFIG), &o, &mut exec).0.unwrap();
    assert!(read(t.path(), quay).contains("10.0.0.5"));
    run_revert(&root, &mut exec);
    assert_eq!(read(t.path(), quay), b, "the admin's latest edit, not A");
}

#[test]
fn a_failed_daemon_action_is_retried_until_it_succeeds() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), CONFIG_TOML, CONTAINERD_V2.as_bytes());
    let root = Root::new(t.path());
    let o = opts(&[RuntimeKind::Containerd]);
    let mut exec = RecordingExecutor {
        fail: 2,
        ..Default::default()
    };
    let (r, out) = run_apply(&root, &cfg(CONFIG), &o, &mut exec);
    let e = r.unwrap_err().to_string();
    assert!(e.contains("containerd"), "{e}");
    assert!(
        out.contains("restart (config_path enabled in config.toml) FAILED"),
        "{out}"
    );
    assert_eq!(status(&root).unwrap().pending_actions.len(), 1);

    // No file changes now, but the restart is still owed: tried again,
    // and still reported as a failure while it fails.
    let (r, out) = run_apply(&root, &cfg(CONFIG), &o, &mut exec);
    assert!(r.is_err(), "{out}");
    assert!(status_table(&status(&root).unwrap()).contains("pending: containerd restart"));
    let (r, out) = run_apply(&root, &cfg(CONFIG), &o, &mut exec);
    let r = r.unwrap();
    assert!(r.files.is_empty(), "{out}");
    assert_eq!(r.actions.len(), 1, "{out}");
    assert_eq!(
        exec.calls,
        [
            "restart containerd",
            "restart containerd",
            "restart containerd"
        ]
    );
    assert!(status(&root).unwrap().pending_actions.is_empty());

    // Done: nothing owed any more.
    let (r, out) = run_apply(&root, &cfg(CONFIG), &o, &mut exec);
    assert!(r.unwrap().actions.is_empty(), "{out}");
    assert!(out.contains("no changes"), "{out}");
    assert_eq!(exec.calls.len(), 3);
}

#[test]
fn one_broken_file_does_not_stop_the_revert_of_the_others() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), HOSTS, HOSTS_ORIG.as_bytes());
    write(t.path(), CONFIG_TOML, CONTAINERD_V2.as_bytes());
    let before = snapshot(t.path());
    let root = Root::new(t.path());
    let o = opts(&[RuntimeKind::Docker, RuntimeKind::Containerd]);
    let mut exec = RecordingExecutor::default();
    run_apply(&root, &cfg(CONFIG), &o, &mut exec).0.unwrap();
    let applied = read(t.path(), CONFIG_TOML);
    let broken = format!("{applied}[plugins\n");
    write(t.path(), CONFIG_TOML, broken.as_bytes());

    let mut out = Vec::new();
    let e = revert(&root, &revert_opts(), &mut exec, &mut out)
        .unwrap_err()
        .to_string();
    let out = String::from_utf8(out).unwrap();
    assert!(e.contains(CONFIG_TOML), "{e}");
    assert!(!e.contains("/etc/hosts"), "{e}");
    assert_eq!(read(t.path(), HOSTS), HOSTS_ORIG, "{out}");
    assert_eq!(read(t.path(), CONFIG_TOML), broken);
    assert!(!t.path().join("etc/docker/daemon.json").exists(), "{out}");
    let st = status(&root).unwrap();
    assert_eq!(
        st.files.iter().map(|f| f.path.as_str()).collect::<Vec<_>>(),
        [CONFIG_TOML]
    );

    // The admin repairs the file: the next revert finishes the job.
    write(t.path(), CONFIG_TOML, applied.as_bytes());
    run_revert(&root, &mut exec);
    assert_eq!(snapshot(t.path()), before);
}

/// A file someone else writes between the agent's read (the plan) and its
/// write keeps their content: the commit refuses, writes nothing, records
/// nothing, and the next apply plans from what is there now.
#[test]
fn a_file_changed_between_plan_and_write_is_not_overwritten() {
    let t = tempfile::tempdir().unwrap();
    let ours = b"127.0.0.1 localhost\n";
    let theirs = "127.0.0.1 localhost\n10.1.1.1 theirs.example\n";
    write(t.path(), "/etc/hosts", ours);
    let root = Root::new(t.path());
    let mut st = state::State::default();
    let change = plan::Change {
        path: "/etc/hosts".into(),
        before: Some(ours.to_vec()),
        after: Some(b"127.0.0.1 localhost\n10.0.0.5 quay.io\n".to_vec()),
        record: None,
        mode: 0o644,
        notes: Vec::new(),
        restored: false,
    };
    write(t.path(), "/etc/hosts", theirs.as_bytes());
    let mut out = Vec::new();
    let err = plan::commit(&root, &mut st, vec![change], &mut out).unwrap_err();
    assert!(
        matches!(&err, AgentError::ChangedMeanwhile { path } if path == "/etc/hosts"),
        "{err}"
    );
    assert_eq!(read(t.path(), "/etc/hosts"), theirs);
    assert!(state::load(&root).unwrap().is_none());

    // The next apply starts from their content and keeps it.
    let mut exec = RecordingExecutor::default();
    let (r, out) = run_apply(
        &root,
        &cfg(CONFIG),
        &opts(&[RuntimeKind::Docker]),
        &mut exec,
    );
    r.unwrap();
    let hosts = read(t.path(), "/etc/hosts");
    assert!(hosts.starts_with(theirs), "{out}\n{hosts}");
    assert!(hosts.contains("quay.io"), "{hosts}");
}

/// containerd merges the files of `imports` over config.toml, the last
/// `config_path` winning: hosts.toml files go where that one points,
/// config.toml is not touched (nor containerd restarted), and revert gives
/// every byte back. Relative entries and `*` patterns resolve as
/// containerd resolves them.
#[test]
fn an_imported_config_path_decides_where_hosts_toml_goes() {
    let t = tempfile::tempdir().unwrap();
    let main = "version = 2\nimports = [\"conf.d/*.toml\", \"/etc/containerd/last.toml\"]\n";
    write(t.path(), CONFIG_TOML, main.as_bytes());
    let section = |dir: &str| {
        format!("[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{dir}\"\n")
    };
    write(
        t.path(),
        "/etc/containerd/conf.d/10-registry.toml",
        section("/etc/containerd/first").as_bytes(),
    );
    write(
        t.path(),
        "/etc/containerd/conf.d/README",
        b"not toml, not imported\n",
    );
    // Loaded after the conf.d files: its config_path wins.
    write(
        t.path(),
        "/etc/containerd/last.toml",
        section("/etc/containerd/registries:/etc/docker/certs.d").as_bytes(),
    );
    let before = snapshot(t.path());
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    let (r, out) = run_apply(
        &root,
        &cfg(CONFIG),
        &opts(&[RuntimeKind::Containerd]),
        &mut exec,
    );
    r.unwrap();
    assert_eq!(read(t.path(), CONFIG_TOML), main, "{out}");
    assert!(exec.calls.is_empty(), "no restart: {:?}", exec.calls);
    let quay = read(t.path(), "/etc/containerd/registries/quay.io/hosts.toml");
    assert!(quay.contains("https://10.0.0.5"), "{quay}");
    assert!(!t.path().join("etc/containerd/certs.d").exists(), "{out}");
    assert!(!t.path().join("etc/containerd/first").exists(), "{out}");
    let mut exec = RecordingExecutor::default();
    run_revert(&root, &mut exec);
    assert_eq!(snapshot(t.path()), before);
}

/// A root holding `files` (host path, content) and a containerd apply of
/// [`CONFIG`] on it: the root, the result and the output.
fn containerd_apply_on(
    files: &[(&str, &str)],
) -> (tempfile::TempDir, Result<Report, AgentError>, String) {
    let t = tempfile::tempdir().unwrap();
    for (path, content) in files {
        write(t.path(), path, content.as_bytes());
    }
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    let (r, out) = run_apply(
        &root,
        &cfg(CONFIG),
        &opts(&[RuntimeKind::Containerd]),
        &mut exec,
    );
    (t, r, out)
}

/// What containerd would choke on in an imported file is refused, naming
/// that file, and nothing is written: deprecated mirrors next to a
/// config_path, `config_path = ""`, an import that does not exist. A
/// pattern matching nothing is no import at all.
#[test]
fn imports_containerd_would_choke_on_are_refused_naming_the_file() {
    let importing = |what: &str| format!("version = 2\nimports = [\"{what}\"]\n");
    let extra = "/etc/containerd/extra.toml";
    let cases = [
        (
            "[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://m.example\"]\n",
            "/etc/containerd/extra.toml: has containerd's deprecated",
        ),
        (
            "[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"\"\n",
            "/etc/containerd/extra.toml: sets the CRI registry's `config_path` to \"\"",
        ),
    ];
    for (content, want) in cases {
        let main = importing(extra);
        let files = [(CONFIG_TOML, main.as_str()), (extra, content)];
        let (t, r, _) = containerd_apply_on(&files);
        let e = r.unwrap_err().to_string();
        assert!(e.starts_with(want), "{e}");
        assert_eq!(read(t.path(), CONFIG_TOML), main);
        assert!(!t.path().join("etc/containerd/certs.d").exists());
    }

    let main = importing("/etc/containerd/gone.toml");
    let (_t, r, _) = containerd_apply_on(&[(CONFIG_TOML, main.as_str())]);
    let e = r.unwrap_err().to_string();
    assert!(
        e.starts_with("/etc/containerd/gone.toml: is in containerd's `imports` but does not exist"),
        "{e}"
    );

    let main = importing("/etc/containerd/conf.d/*.toml");
    let (t, r, out) = containerd_apply_on(&[(CONFIG_TOML, main.as_str())]);
    r.unwrap();
    assert!(
        read(t.path(), CONFIG_TOML).contains("config_path = \"/etc/containerd/certs.d\""),
        "{out}"
    );
    assert!(
        t.path()
            .join("etc/containerd/certs.d/quay.io/hosts.toml")
            .exists()
    );
}

#[test]
fn import_entries_resolve_as_containerd_resolves_them() {
    use crate::patch::containerd::import_path;
    let main = "/etc/containerd/config.toml";
    assert_eq!(
        import_path(main, "conf.d/a.toml"),
        "/etc/containerd/conf.d/a.toml"
    );
    assert_eq!(import_path(main, "/opt/x.toml"), "/opt/x.toml");
    assert_eq!(import_path(main, "../x//./y.toml"), "/etc/x/y.toml");
    assert_eq!(import_path("/a.toml", "../../b.toml"), "/b.toml");
}

/// containers/image lets a later `[[registry]]` for a prefix replace an
/// earlier one whole, so the drop-in carries what the admin set for the
/// prefixes it routes (insecure, their mirrors after the proxy's), leaves
/// out a registry the admin blocked or sends elsewhere than the proxy's
/// upstream, and says when a drop-in read after it replaces the proxy
/// mirror.
#[test]
fn crio_keeps_what_the_admin_set_for_a_registry() {
    let conf = "unqualified-search-registries = [\"docker.io\"]\n\
        [[registry]]\nlocation = \"quay.io\"\nblocked = true\n\
        [[registry]]\nprefix = \"docker.io\"\nlocation = \"hub.corp.example/docker\"\n\
        [[registry]]\nprefix = \"ghcr.io\"\nlocation = \"ghcr.io\"\ninsecure = true\n\
        [[registry.mirror]]\nlocation = \"own-mirror.example\"\npull-from-mirror = \"digest-only\"\n";
    let later = "[[registry]]\nprefix = \"ghcr.io\"\nlocation = \"ghcr.io\"\n";
    let t = tempfile::tempdir().unwrap();
    write(t.path(), "/etc/containers/registries.conf", conf.as_bytes());
    write(
        t.path(),
        "/etc/containers/registries.conf.d/90-site.conf",
        later.as_bytes(),
    );
    let before = snapshot(t.path());
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    let (r, out) = run_apply(&root, &cfg(CONFIG), &opts(&[RuntimeKind::Crio]), &mut exec);
    r.unwrap();
    let d = read(t.path(), DROP_IN);
    let doc: toml_edit::DocumentMut = d.parse().unwrap();
    let regs = doc["registry"].as_array_of_tables().unwrap();
    let prefixes: Vec<_> = regs.iter().map(|r| r["prefix"].as_str().unwrap()).collect();
    assert_eq!(prefixes, ["ghcr.io"], "{out}\n{d}");
    let ghcr = regs.get(0).unwrap();
    assert_eq!(ghcr["location"].as_str(), Some("ghcr.io"), "{d}");
    assert_eq!(ghcr["insecure"].as_bool(), Some(true), "{d}");
    let mirrors = ghcr["mirror"].as_array_of_tables().unwrap();
    let locations: Vec<_> = mirrors
        .iter()
        .map(|m| m["location"].as_str().unwrap())
        .collect();
    assert_eq!(locations, ["10.0.0.5/ghcr.io", "own-mirror.example"], "{d}");
    assert_eq!(
        mirrors.get(1).unwrap()["pull-from-mirror"].as_str(),
        Some("digest-only")
    );
    for said in [
        "crio: quay.io is blocked in /etc/containers/registries.conf: left blocked",
        "crio: docker.io is rewritten to hub.corp.example/docker in /etc/containers/registries.conf, not to registry-1.docker.io",
        "crio: /etc/containers/registries.conf.d/90-site.conf also has a [[registry]] for ghcr.io",
    ] {
        assert!(out.contains(said), "{said}:\n{out}");
    }
    // Said again on an apply that changes nothing.
    let (r, out) = run_apply(&root, &cfg(CONFIG), &opts(&[RuntimeKind::Crio]), &mut exec);
    assert!(r.unwrap().files.is_empty(), "{out}");
    assert!(out.contains("quay.io is blocked"), "{out}");
    let mut exec = RecordingExecutor::default();
    run_revert(&root, &mut exec);
    assert_eq!(snapshot(t.path()), before);
}
