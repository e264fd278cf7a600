//! CRI-O and podman: the registries.conf.d drop-in and the admin's
//! `[[registry]]` settings it carries.

use super::*;

/// Applies the CRI-O part; the drop-in as text and as TOML, and the
/// apply's output.
fn apply_crio(
    root: &Root,
    exec: &mut RecordingExecutor,
) -> (String, toml_edit::DocumentMut, String) {
    let (r, out) = apply_config(root, &[RuntimeKind::Crio], exec);
    r.unwrap();
    let d = read(root.dir(), DROP_IN);
    let doc = d.parse().unwrap();
    (d, doc, out)
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
    let (d, doc, out) = apply_crio(&root, &mut exec);
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
    let (r, out) = apply_config(&root, &[RuntimeKind::Crio], &mut exec);
    assert!(r.unwrap().files.is_empty(), "{out}");
    assert!(out.contains("quay.io is blocked"), "{out}");
    assert_reverts_to(&root, t.path(), &before);
}

/// A registries.conf in the v1 format: containers/image turns
/// `[registries.block]` and `[registries.insecure]` into per-registry
/// entries that the agent's drop-in would replace, so a blocked registry
/// stays blocked (not mirrored) and an insecure one keeps `insecure`.
#[test]
fn crio_keeps_a_v1_registries_conf_block_and_insecure() {
    let conf = "[registries.search]\nregistries = [\"docker.io\"]\n\
        [registries.insecure]\nregistries = [\"ghcr.io\"]\n\
        [registries.block]\nregistries = [\"quay.io\"]\n";
    let t = tempfile::tempdir().unwrap();
    write(t.path(), "/etc/containers/registries.conf", conf.as_bytes());
    let before = snapshot(t.path());
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    let (d, doc, out) = apply_crio(&root, &mut exec);
    let regs = doc["registry"].as_array_of_tables().unwrap();
    let prefixes: Vec<_> = regs.iter().map(|r| r["prefix"].as_str().unwrap()).collect();
    assert!(!prefixes.contains(&"quay.io"), "{out}\n{d}");
    let ghcr = regs
        .iter()
        .find(|r| r["prefix"].as_str() == Some("ghcr.io"))
        .unwrap();
    assert_eq!(ghcr["insecure"].as_bool(), Some(true), "{d}");
    assert!(
        out.contains("crio: quay.io is blocked in /etc/containers/registries.conf"),
        "{out}"
    );
    assert_reverts_to(&root, t.path(), &before);
}
