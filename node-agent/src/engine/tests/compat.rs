//! State written by a newer agent, read by this one.

use super::*;

/// A helm rollback runs an older agent on the state a newer one wrote:
/// the file the newer agent manages with a kind this one does not know
/// keeps its content, record and backup through apply and revert, and
/// the newer agent's fields survive this agent's saves.
#[test]
fn a_newer_agents_file_is_left_alone_by_apply_and_revert() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), HOSTS, HOSTS_ORIG.as_bytes());
    write(t.path(), DAEMON_JSON, DAEMON_JSON_ORIG.as_bytes());
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    apply_config(&root, &[RuntimeKind::Docker], &mut exec)
        .0
        .unwrap();

    // What the newer agent left.
    let thing = "/etc/newer/thing.conf";
    let thing_backup = state::backup_path(thing);
    let mut st: serde_json::Value =
        serde_json::from_str(&read(t.path(), state::STATE_FILE)).unwrap();
    st["newTopLevel"] = serde_json::json!({"a": [1]});
    st["files"][HOSTS]["kind"] = serde_json::json!({"type": "hostsBlockV2", "zones": ["a"]});
    let newer_record = serde_json::json!({
        "kind": {"type": "somethingNew"},
        "existedBefore": true,
        "backup": thing_backup,
        "writtenSha256": "11",
    });
    st["files"][thing] = newer_record.clone();
    st["files"][DAEMON_JSON]["newInRecord"] = 7.into();
    st["files"][DAEMON_JSON]["kind"]["newInKind"] = "k".into();
    let newer_hosts = st["files"][HOSTS].clone();
    write(
        t.path(),
        state::STATE_FILE,
        serde_json::to_string_pretty(&st).unwrap().as_bytes(),
    );
    let hosts = format!("{HOSTS_ORIG}# the newer agent's own block\r\n");
    write(t.path(), HOSTS, hosts.as_bytes());
    write(t.path(), thing, b"newer\n");
    write(t.path(), &thing_backup, b"original\n");

    // An apply that adds a registry: everything else is applied.
    let more = format!("{CONFIG}  - {{host: registry.k8s.io}}\n");
    let (r, out) = run_apply(&root, &cfg(&more), &opts(&[RuntimeKind::Docker]), &mut exec);
    r.unwrap();
    assert!(
        out.contains(
            "/etc/hosts: left alone: managed by a newer agent (record kind `hostsBlockV2`)"
        ),
        "{out}"
    );
    assert_eq!(read(t.path(), HOSTS), hosts, "{out}");
    assert_eq!(
        read(
            t.path(),
            "/etc/docker/certs.d/registry.k8s.io/pullthrough-ca.crt"
        ),
        PEM
    );
    let saved: serde_json::Value =
        serde_json::from_str(&read(t.path(), state::STATE_FILE)).unwrap();
    assert_eq!(saved["files"][HOSTS], newer_hosts);
    assert_eq!(saved["files"][thing], newer_record);
    assert_eq!(saved["newTopLevel"], st["newTopLevel"]);
    assert_eq!(saved["files"][DAEMON_JSON]["newInRecord"], 7);
    assert_eq!(saved["files"][DAEMON_JSON]["kind"]["newInKind"], "k");
    let s = status(&root).unwrap();
    let newer: Vec<_> = s
        .files
        .iter()
        .filter(|f| f.state == "managed by a newer agent")
        .map(|f| f.path.as_str())
        .collect();
    assert_eq!(newer, [HOSTS, thing]);
    assert!(status_table(&s).contains("managed by a newer agent"));

    // Revert gives back the rest and names what it left.
    let mut out = Vec::new();
    let e = revert(&root, &revert_opts(), &mut exec, &mut out)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("/etc/hosts: managed by a newer agent") && e.contains(thing),
        "{e}"
    );
    assert_eq!(read(t.path(), DAEMON_JSON), DAEMON_JSON_ORIG);
    assert!(!t.path().join("etc/docker/certs.d").exists());
    assert_eq!(read(t.path(), HOSTS), hosts);
    assert_eq!(read(t.path(), thing), "newer\n");
    assert_eq!(read(t.path(), &thing_backup), "original\n");
    let left: serde_json::Value = serde_json::from_str(&read(t.path(), state::STATE_FILE)).unwrap();
    assert_eq!(
        left["files"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        [HOSTS, thing]
    );
    assert_eq!(left["newTopLevel"], st["newTopLevel"]);
}
