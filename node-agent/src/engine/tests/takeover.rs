//! Files the agent generated whole that an admin replaced with their own
//! (no agent header any more): the next apply takes them as the admin's,
//! keeps a backup, says so, and revert gives them back.

use super::*;

const QUAY: &str = "/etc/containerd/certs.d/quay.io/hosts.toml";

/// An admin's own hosts.toml in place of the generated one is merged
/// like any admin hosts.toml (the proxy first, their hosts after it),
/// and revert gives their file back byte for byte.
#[test]
fn an_admins_hosts_toml_in_place_of_the_generated_one_is_merged_and_kept() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), CONFIG_TOML, CONTAINERD_V2.as_bytes());
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    apply_config(&root, &[RuntimeKind::Containerd], &mut exec)
        .0
        .unwrap();
    assert!(crate::patch::is_generated(read(t.path(), QUAY).as_bytes()));

    let admin =
        "server = \"https://quay.io\"\n[host.\"https://mine\"]\n  capabilities = [\"pull\"]\n";
    write(t.path(), QUAY, admin.as_bytes());
    let (r, out) = apply_config(&root, &[RuntimeKind::Containerd], &mut exec);
    r.unwrap();
    let now = read(t.path(), QUAY);
    let ours = now.find("[host.\"https://10.0.0.5\"]").expect(&now);
    assert!(
        ours < now.find("[host.\"https://mine\"]").expect(&now),
        "{now}"
    );
    assert!(out.contains("taken as the admin's"), "{out}");
    // Idempotent.
    let (r, out) = apply_config(&root, &[RuntimeKind::Containerd], &mut exec);
    assert!(r.unwrap().files.is_empty(), "{out}");

    run_revert(&root, &mut exec);
    assert_eq!(read(t.path(), QUAY), admin);
}

/// The admin's own file at the CA path or in place of the CRI-O drop-in
/// is backed up before the agent writes its own again, and revert puts
/// it back.
#[test]
fn an_admins_file_in_place_of_a_ca_copy_or_the_drop_in_comes_back_on_revert() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), "/etc/containers/registries.conf", b"");
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    apply_config(&root, &[RuntimeKind::Crio], &mut exec)
        .0
        .unwrap();
    let ca = "/etc/containers/certs.d/10.0.0.5/pullthrough-ca.crt";
    assert_eq!(read(t.path(), ca), PEM);

    let own_ca = "-----BEGIN CERTIFICATE-----\nMIIBadmin\n-----END CERTIFICATE-----\n";
    let own_drop_in =
        "[[registry]]\nprefix = \"quay.io\"\nlocation = \"quay.io\"\ninsecure = true\n";
    write(t.path(), ca, own_ca.as_bytes());
    write(t.path(), DROP_IN, own_drop_in.as_bytes());
    let (r, out) = apply_config(&root, &[RuntimeKind::Crio], &mut exec);
    r.unwrap();
    assert_eq!(read(t.path(), ca), PEM, "{out}");
    assert!(
        crate::patch::is_generated(read(t.path(), DROP_IN).as_bytes()),
        "{out}"
    );
    assert_eq!(out.matches("taken as the admin's").count(), 2, "{out}");

    run_revert(&root, &mut exec);
    assert_eq!(read(t.path(), ca), own_ca);
    assert_eq!(read(t.path(), DROP_IN), own_drop_in);
}

/// The agent no longer wants its drop-in (the admin blocked the one
/// registry it mirrored), and the admin's own file stands in its place:
/// it stays, and leaves the agent's record.
#[test]
fn an_admins_file_in_place_of_a_drop_in_the_agent_gives_up_stays() {
    let t = tempfile::tempdir().unwrap();
    let conf = "/etc/containers/registries.conf";
    write(t.path(), conf, b"");
    let root = Root::new(t.path());
    let c = cfg("proxy: {address: 10.0.0.5, caFile: ca.crt}\nregistries: [{host: quay.io}]\n");
    let mut exec = RecordingExecutor::default();
    run_apply(&root, &c, &opts(&[RuntimeKind::Crio]), &mut exec)
        .0
        .unwrap();
    let own = "[[registry]]\nprefix = \"ghcr.io\"\nlocation = \"ghcr.io\"\n";
    write(t.path(), DROP_IN, own.as_bytes());
    write(
        t.path(),
        conf,
        b"[[registry]]\nlocation = \"quay.io\"\nblocked = true\n",
    );
    let (r, out) = run_apply(&root, &c, &opts(&[RuntimeKind::Crio]), &mut exec);
    r.unwrap();
    assert_eq!(read(t.path(), DROP_IN), own, "{out}");
    run_revert(&root, &mut exec);
    assert_eq!(read(t.path(), DROP_IN), own);
}

/// The agent merged its host into the admin's own hosts.toml; the admin
/// then deletes the file. The next apply writes a generated one, and
/// their deletion is the new original: its old backup goes, and revert
/// removes the generated file instead of bringing theirs back.
#[test]
fn an_admins_hosts_toml_they_deleted_stays_deleted_after_revert() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), CONFIG_TOML, CONTAINERD_V2.as_bytes());
    let admin =
        "server = \"https://quay.io\"\n[host.\"https://mine\"]\n  capabilities = [\"pull\"]\n";
    write(t.path(), QUAY, admin.as_bytes());
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    apply_config(&root, &[RuntimeKind::Containerd], &mut exec)
        .0
        .unwrap();
    assert!(read(t.path(), QUAY).contains("https://mine"));
    let backup = t
        .path()
        .join(state::backup_path(QUAY).trim_start_matches('/'));
    assert!(backup.exists());

    fs::remove_file(t.path().join(QUAY.trim_start_matches('/'))).unwrap();
    let (r, out) = apply_config(&root, &[RuntimeKind::Containerd], &mut exec);
    r.unwrap();
    assert!(
        crate::patch::is_generated(read(t.path(), QUAY).as_bytes()),
        "{out}"
    );
    assert!(out.contains("deleted by someone else"), "{out}");
    assert!(!backup.exists(), "the deleted file's backup stays\n{out}");

    let (_, out) = run_revert(&root, &mut exec);
    assert!(
        !t.path().join(QUAY.trim_start_matches('/')).exists(),
        "{out}"
    );
    // Their directory stays; only the agent's files left it.
    assert!(t.path().join("etc/containerd/certs.d/quay.io").is_dir());
}

/// So too for the admin's own file the agent took over at a CA path and
/// at the CRI-O drop-in, then deleted by them.
#[test]
fn an_admins_ca_or_drop_in_they_deleted_stays_deleted_after_revert() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), "/etc/containers/registries.conf", b"");
    let ca = "/etc/containers/certs.d/10.0.0.5/pullthrough-ca.crt";
    let own_ca = "-----BEGIN CERTIFICATE-----\nMIIBadmin\n-----END CERTIFICATE-----\n";
    write(t.path(), ca, own_ca.as_bytes());
    write(t.path(), DROP_IN, b"[[registry]]\nprefix = \"x.io\"\n");
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    apply_config(&root, &[RuntimeKind::Crio], &mut exec)
        .0
        .unwrap();
    for p in [ca, DROP_IN] {
        fs::remove_file(t.path().join(p.trim_start_matches('/'))).unwrap();
    }
    let (r, out) = apply_config(&root, &[RuntimeKind::Crio], &mut exec);
    r.unwrap();
    assert_eq!(read(t.path(), ca), PEM, "{out}");
    let (_, out) = run_revert(&root, &mut exec);
    for p in [ca, DROP_IN] {
        assert!(
            !t.path().join(p.trim_start_matches('/')).exists(),
            "{p}\n{out}"
        );
    }
}
