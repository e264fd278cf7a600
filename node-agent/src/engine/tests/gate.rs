//! The run loop's health gate: closing it empties the `/etc/hosts` block
//! whatever else the apply runs into.

use super::*;

/// Another runtime's file refused (an admin's broken registries.conf.d
/// drop-in) must not keep hijacked names pointing at a proxy that is
/// down: the hosts block is emptied anyway, and the refusal is still the
/// apply's error.
#[test]
fn closing_the_gate_empties_the_hosts_block_when_another_runtime_fails() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), HOSTS, b"127.0.0.1 localhost\n");
    write(t.path(), "/etc/containers/registries.conf", b"");
    let root = Root::new(t.path());
    let runtimes = [RuntimeKind::Docker, RuntimeKind::Crio];
    let mut exec = RecordingExecutor::default();
    apply_config(&root, &runtimes, &mut exec).0.unwrap();
    assert!(read(t.path(), HOSTS).contains("10.0.0.5\tquay.io"));

    let broken = "/etc/containers/registries.conf.d/90-site.conf";
    write(
        t.path(),
        broken,
        b"[registry]\nprefix = \"quay.io\"\nlocation = \"quay.io\"\n",
    );
    let mut o = opts(&runtimes);
    o.hosts_gate_closed = true;
    let (r, out) = run_apply(&root, &cfg(CONFIG), &o, &mut exec);
    let e = r.unwrap_err().to_string();
    assert!(e.starts_with(broken), "{e}");
    let hosts = read(t.path(), HOSTS);
    assert!(!hosts.contains("10.0.0.5"), "{out}\n{hosts}");
    assert!(hosts.starts_with("127.0.0.1 localhost\n"), "{hosts}");
    assert!(
        out.contains("/etc/hosts: health gate closed: block emptied although the apply failed"),
        "{out}"
    );

    // The block kept its place and record: the gate reopens once the
    // drop-in is fixed, and revert still gives the file back.
    fs::remove_file(t.path().join(broken.trim_start_matches('/'))).unwrap();
    apply_config(&root, &runtimes, &mut exec).0.unwrap();
    assert!(read(t.path(), HOSTS).contains("10.0.0.5\tquay.io"));
    run_revert(&root, &mut exec);
    assert_eq!(read(t.path(), HOSTS), "127.0.0.1 localhost\n");
}
