//! An apply whose state was saved but whose file write did not happen (a
//! full disk, an immutable file, the agent killed in between): the agent's
//! old content left on disk is still the agent's, not the admin's.

use super::*;
use crate::fsio::{TEMP_RAND_BYTES, parent};

const CA: &str = "/etc/containers/certs.d/10.0.0.5/pullthrough-ca.crt";
const NEW_PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBnew\n-----END CERTIFICATE-----\n";

fn with_ca(pem: &str) -> AgentConfig {
    let mut c = cfg("proxy: {address: 10.0.0.5, caFile: ca.crt}\nregistries: [{host: quay.io}]\n");
    c.ca_pem = Some(pem.as_bytes().to_vec());
    c
}

/// Applies the CRI-O config with the proxy's first CA, then with a new
/// one whose write fails after the state named it: a file planted at the
/// temp file's name (made known) stops the write as ENOSPC would. Returns
/// the tree as it was before anything was applied.
fn interrupted_ca_rotation(
    root: &Root,
    exec: &mut RecordingExecutor,
) -> BTreeMap<String, (Option<Vec<u8>>, u32)> {
    let dir = root.dir();
    write(dir, "/etc/containers/registries.conf", b"");
    let before = snapshot(dir);
    let o = opts(&[RuntimeKind::Crio]);
    run_apply(root, &with_ca(PEM), &o, exec).0.unwrap();
    assert_eq!(read(dir, CA), PEM);

    let plant = format!("{}/.pullthrough-ca.crt.pullthrough-tmp.", parent(CA));
    write(dir, &plant, b"");
    TEMP_RAND_BYTES.with(|n| n.set(0));
    let (r, out) = run_apply(root, &with_ca(NEW_PEM), &o, exec);
    TEMP_RAND_BYTES.with(|n| n.set(12));
    fs::remove_file(dir.join(plant.trim_start_matches('/'))).unwrap();
    let e = r.unwrap_err().to_string();
    assert!(e.contains("creating temp file"), "{e}\n{out}");
    // The state names the new CA; the disk still has the old one.
    assert_eq!(read(dir, CA), PEM);
    before
}

/// The next apply writes the new CA over the agent's old one as its own
/// (no "taken as the admin's", no backup of the old proxy CA), and revert
/// removes the file the agent created.
#[test]
fn an_interrupted_write_leaves_the_agents_old_ca_its_own() {
    let t = tempfile::tempdir().unwrap();
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    let before = interrupted_ca_rotation(&root, &mut exec);

    let (r, out) = run_apply(
        &root,
        &with_ca(NEW_PEM),
        &opts(&[RuntimeKind::Crio]),
        &mut exec,
    );
    r.unwrap();
    assert!(!out.contains("admin's"), "{out}");
    assert!(out.contains(&format!("updated   {CA}")), "{out}");
    assert_eq!(read(t.path(), CA), NEW_PEM);
    // Written: the old CA is no longer the agent's.
    let st = read(t.path(), state::STATE_FILE);
    assert!(!st.contains("pendingWrite"), "{st}");
    assert!(
        !t.path()
            .join(state::backup_path(CA).trim_start_matches('/'))
            .exists(),
        "the agent's old CA was backed up as the admin's\n{out}"
    );
    assert_reverts_to(&root, t.path(), &before);
}

/// Reverted right after the interrupted apply, the old proxy CA goes too:
/// it is the agent's, not a file someone put there since.
#[test]
fn revert_after_an_interrupted_write_removes_the_agents_old_ca() {
    let t = tempfile::tempdir().unwrap();
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    let before = interrupted_ca_rotation(&root, &mut exec);
    let s = status(&root).unwrap();
    let ca = s.files.iter().find(|f| f.path == CA).unwrap();
    assert!(ca.state.starts_with("not yet written"), "{ca:?}");
    assert_reverts_to(&root, t.path(), &before);
}
