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

mod compat;
mod containerd;
mod crio;
mod docker;
mod gate;
mod interrupted;
mod meanwhile;
mod takeover;

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
        reload_settle: Duration::ZERO,
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

/// `apply` of the usual [`CONFIG`] for these runtimes.
fn apply_config(
    root: &Root,
    runtimes: &[RuntimeKind],
    exec: &mut RecordingExecutor,
) -> (Result<Report, AgentError>, String) {
    run_apply(root, &cfg(CONFIG), &opts(runtimes), exec)
}

/// Revert, then every byte and mode under `dir` is as in `before`.
fn assert_reverts_to(root: &Root, dir: &Path, before: &BTreeMap<String, (Option<Vec<u8>>, u32)>) {
    let mut exec = RecordingExecutor::default();
    let (_, out) = run_revert(root, &mut exec);
    assert_eq!(&snapshot(dir), before, "{out}");
}

fn run_revert(root: &Root, exec: &mut RecordingExecutor) -> (Report, String) {
    let mut out = Vec::new();
    let r = revert(root, &revert_opts(), exec, &mut out).unwrap();
    (r, String::from_utf8(out).unwrap())
}

const DAEMON_JSON_ORIG: &str =
    "{\n\t\"log-driver\": \"json-file\",\n\t\"log-opts\": {\"max-size\": \"10m\"}\n}";
const HOSTS_ORIG: &str = "127.0.0.1\tlocalhost\r\n::1 localhost ip6-localhost # v6\r\n";

const CONTAINERD_V2: &str = "version = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.k8s.io/pause:3.9\"\n";

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
fn admin_edits_after_apply_survive_revert() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), DAEMON_JSON, b"{\"debug\": true}\n");
    write(t.path(), HOSTS, b"127.0.0.1 localhost\n");
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    apply_config(&root, &[RuntimeKind::Docker], &mut exec)
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

#[test]
fn switching_runtimes_reverts_the_old_ones_files() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), HOSTS, b"127.0.0.1 localhost\n");
    let before = snapshot(t.path());
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    apply_config(&root, &[RuntimeKind::Docker], &mut exec)
        .0
        .unwrap();
    let mut exec = RecordingExecutor::default();
    let (r, out) = apply_config(&root, &[RuntimeKind::Crio], &mut exec);
    r.unwrap();
    assert_eq!(read(t.path(), HOSTS), "127.0.0.1 localhost\n", "{out}");
    assert!(!t.path().join("etc/docker").exists(), "{out}");
    // registry-mirrors left dockerd's config: dockerd reads it emptied
    // first (its reload skips keys that are gone), then the file goes.
    assert!(
        out.contains("dockerd: reload (SIGHUP) (registry-mirrors changed (reloadable); registry-mirrors emptied first"),
        "{out}"
    );
    assert_eq!(exec.calls, ["reload docker", "reload crio"], "{out}");
    assert_reverts_to(&root, t.path(), &before);
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
    let (r, out) = apply_config(&root, &[RuntimeKind::Docker], &mut exec);
    r.unwrap();
    let hosts = read(t.path(), "/etc/hosts");
    assert!(hosts.starts_with(theirs), "{out}\n{hosts}");
    assert!(hosts.contains("quay.io"), "{hosts}");
}

/// A file that did not exist when the plan was made and that someone
/// creates before the write is theirs: the plan's "create" must not
/// replace it, and nothing is recorded for it.
#[test]
fn a_file_created_between_plan_and_write_is_not_overwritten() {
    let t = tempfile::tempdir().unwrap();
    let path = "/etc/containerd/certs.d/quay.io/hosts.toml";
    let theirs = "server = \"https://quay.io\"\n# theirs\n";
    let root = Root::new(t.path());
    let mut st = state::State::default();
    let change = plan::Change {
        path: path.into(),
        before: None,
        after: Some(b"# generated by pullthrough-agent\nserver = \"https://quay.io\"\n".to_vec()),
        record: Some(state::FileRecord::new(
            state::FileKind::Generated,
            false,
            None,
            Some("0".repeat(64)),
        )),
        mode: 0o644,
        notes: Vec::new(),
        restored: false,
    };
    write(t.path(), path, theirs.as_bytes());
    let before = snapshot(t.path());
    let mut out = Vec::new();
    let err = plan::commit(&root, &mut st, vec![change], &mut out).unwrap_err();
    assert!(
        matches!(&err, AgentError::ChangedMeanwhile { path: p } if p == path),
        "{err}"
    );
    assert_eq!(read(t.path(), path), theirs);
    assert_eq!(
        snapshot(t.path()),
        before,
        "nothing written: no state, no backup"
    );
    assert!(state::load(&root).unwrap().is_none());
}

/// Every file of the plan is checked, not just the first: when the second
/// of two changes was edited meanwhile, the first is not written either,
/// and no backup or state is left behind.
#[test]
fn a_second_file_changed_between_plan_and_write_stops_the_whole_commit() {
    let t = tempfile::tempdir().unwrap();
    let hosts = b"127.0.0.1 localhost\n";
    let daemon = "/etc/docker/daemon.json";
    let ours = b"{\"debug\": true}\n";
    let theirs = "{\"debug\": false}\n";
    write(t.path(), HOSTS, hosts);
    write(t.path(), daemon, ours);
    let root = Root::new(t.path());
    let mut st = state::State::default();
    let change = |path: &str, before: &[u8], after: &[u8], kind| plan::Change {
        path: path.into(),
        before: Some(before.to_vec()),
        after: Some(after.to_vec()),
        // An existing file seen for the first time: a commit that went
        // ahead would back it up first.
        record: Some(state::FileRecord::new(
            kind,
            true,
            None,
            Some("0".repeat(64)),
        )),
        mode: 0o644,
        notes: Vec::new(),
        restored: false,
    };
    let changes = vec![
        change(
            HOSTS,
            hosts,
            b"127.0.0.1 localhost\n10.0.0.5 quay.io\n",
            state::FileKind::HostsBlock,
        ),
        change(
            daemon,
            ours,
            b"{\"debug\": true, \"registry-mirrors\": []}\n",
            state::FileKind::DaemonJson {
                added: Default::default(),
            },
        ),
    ];
    write(t.path(), daemon, theirs.as_bytes());
    let before = snapshot(t.path());
    let mut out = Vec::new();
    let err = plan::commit(&root, &mut st, changes, &mut out).unwrap_err();
    assert!(
        matches!(&err, AgentError::ChangedMeanwhile { path } if path == daemon),
        "{err}"
    );
    assert_eq!(
        read(t.path(), HOSTS).as_bytes(),
        hosts,
        "the first file untouched"
    );
    assert_eq!(read(t.path(), daemon), theirs);
    assert_eq!(
        snapshot(t.path()),
        before,
        "nothing written: no state, no backup"
    );
    assert!(!t.path().join(&state::backup_path(HOSTS)[1..]).exists());
    assert!(state::load(&root).unwrap().is_none());
}

/// A backup left behind without a record (a crash before it was removed,
/// or an admin who deleted state.json) is not the original of a file the
/// agent manages anew: revert gives back the file as it was at this apply.
#[test]
fn an_orphan_backup_is_not_taken_for_the_original() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), HOSTS, b"127.0.0.1 localhost NEW\n");
    write(
        t.path(),
        &state::backup_path(HOSTS),
        b"127.0.0.1 localhost OLD\n",
    );
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
    run_revert(&root, &mut exec);
    assert_eq!(read(t.path(), HOSTS), "127.0.0.1 localhost NEW\n");
}

/// An executor that records daemon.json as dockerd reads it at each
/// reload.
struct SeesDaemonJson {
    file: std::path::PathBuf,
    seen: Vec<Option<serde_json::Value>>,
}

impl Executor for SeesDaemonJson {
    fn reload(
        &mut self,
        _: crate::runtime::Service,
    ) -> Result<crate::runtime::Outcome, crate::error::ExecError> {
        let now = fs::read(&self.file).ok();
        self.seen
            .push(now.map(|b| serde_json::from_slice(&b).unwrap()));
        Ok(crate::runtime::Outcome::Done("seen".into()))
    }
    fn restart(
        &mut self,
        s: crate::runtime::Service,
    ) -> Result<crate::runtime::Outcome, crate::error::ExecError> {
        panic!("no restart of {s:?} expected")
    }
    fn validate_daemon_json(&mut self, _: &[u8]) -> Option<Result<(), Rejected>> {
        None
    }
}
