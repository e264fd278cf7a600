//! containerd: config_path, hosts.toml (generated, or an admin's own with
//! the proxy added), migrated mirrors, and the files of `imports`.

use super::*;

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
    apply_config(&root, &[RuntimeKind::Containerd], &mut exec)
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
    assert_reverts_to(&root, t.path(), &before);
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

    assert_reverts_to(&root, t.path(), &before);
}

#[test]
fn containerd_mirrors_need_the_migrate_flag() {
    let t = tempfile::tempdir().unwrap();
    let conf = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://mirror.example\"]\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"mirror.only\"]\n  endpoint = [\"https://own.example\"]\n";
    write(t.path(), CONFIG_TOML, conf.as_bytes());
    let before = snapshot(t.path());
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    let (r, _) = apply_config(&root, &[RuntimeKind::Containerd], &mut exec);
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
    let (r, out) = apply_config(&root, &[RuntimeKind::Containerd], &mut exec);
    assert!(r.unwrap().files.is_empty(), "{out}");
    assert_eq!(
        read(t.path(), "/etc/containerd/certs.d/docker.io/hosts.toml"),
        hub
    );
    assert_eq!(
        read(t.path(), "/etc/containerd/certs.d/mirror.only/hosts.toml"),
        own
    );
    assert_reverts_to(&root, t.path(), &before);
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
    let (r, out) = apply_config(&root, &[RuntimeKind::Containerd], &mut exec);
    r.unwrap();
    assert_eq!(read(t.path(), CONFIG_TOML), main, "{out}");
    assert!(exec.calls.is_empty(), "no restart: {:?}", exec.calls);
    let quay = read(t.path(), "/etc/containerd/registries/quay.io/hosts.toml");
    assert!(quay.contains("https://10.0.0.5"), "{quay}");
    assert!(!t.path().join("etc/containerd/certs.d").exists(), "{out}");
    assert!(!t.path().join("etc/containerd/first").exists(), "{out}");
    assert_reverts_to(&root, t.path(), &before);
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
    let (r, out) = apply_config(&root, &[RuntimeKind::Containerd], &mut exec);
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

/// A config.toml holding registry passwords is 0600: its backup is not
/// readable by more users than the file itself.
#[test]
fn a_backup_keeps_the_originals_mode() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), CONFIG_TOML, CONTAINERD_V2.as_bytes());
    let config = t.path().join(CONFIG_TOML.trim_start_matches('/'));
    fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).unwrap();
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    run_apply(
        &root,
        &cfg(CONFIG),
        &opts(&[RuntimeKind::Containerd]),
        &mut exec,
    )
    .0
    .unwrap();
    let backup = t
        .path()
        .join(state::backup_path(CONFIG_TOML).trim_start_matches('/'));
    let mode = fs::metadata(backup).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
}

/// Revert after `--migrate-containerd-mirrors` gives config.toml its
/// `registry.mirrors` back and removes their hosts.toml files: containerd
/// only sees its mirrors again once restarted.
#[test]
fn revert_of_migrated_mirrors_restarts_containerd() {
    let t = tempfile::tempdir().unwrap();
    let conf = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://mirror.example\"]\n";
    write(t.path(), CONFIG_TOML, conf.as_bytes());
    let root = Root::new(t.path());
    let mut o = opts(&[RuntimeKind::Containerd]);
    o.migrate_containerd_mirrors = true;
    let mut exec = RecordingExecutor::default();
    run_apply(&root, &cfg(CONFIG), &o, &mut exec).0.unwrap();
    assert_eq!(exec.calls, ["restart containerd"]);

    let mut exec = RecordingExecutor::default();
    let (_, out) = run_revert(&root, &mut exec);
    assert_eq!(read(t.path(), CONFIG_TOML), conf);
    assert_eq!(exec.calls, ["restart containerd"], "{out}");
}

/// containerd dropped from the config (not reverted): the apply gives
/// config.toml back, mirrors moved out by `--migrate-containerd-mirrors`
/// included, and containerd only sees them again once restarted.
#[test]
fn deselecting_containerd_after_migrated_mirrors_restarts_it() {
    let t = tempfile::tempdir().unwrap();
    let conf = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://mirror.example\"]\n";
    write(t.path(), CONFIG_TOML, conf.as_bytes());
    let root = Root::new(t.path());
    let mut o = opts(&[RuntimeKind::Docker, RuntimeKind::Containerd]);
    o.migrate_containerd_mirrors = true;
    let mut exec = RecordingExecutor::default();
    run_apply(&root, &cfg(CONFIG), &o, &mut exec).0.unwrap();
    assert!(exec.calls.contains(&"restart containerd".to_string()));

    let mut exec = RecordingExecutor::default();
    let (r, out) = run_apply(
        &root,
        &cfg(CONFIG),
        &opts(&[RuntimeKind::Docker]),
        &mut exec,
    );
    r.unwrap();
    assert_eq!(read(t.path(), CONFIG_TOML), conf, "{out}");
    assert!(
        out.contains("containerd: restart (config.toml restored)"),
        "{out}"
    );
    assert_eq!(
        exec.calls
            .iter()
            .filter(|c| c.as_str() == "restart containerd")
            .count(),
        1,
        "{out}"
    );
    // Done: the next apply leaves containerd alone.
    let mut exec = RecordingExecutor::default();
    let (_, out) = run_apply(
        &root,
        &cfg(CONFIG),
        &opts(&[RuntimeKind::Docker]),
        &mut exec,
    );
    assert_eq!(out.trim(), "no changes");
    assert!(exec.calls.is_empty(), "{out}");
}

/// A config.toml whose mirrors `--migrate-containerd-mirrors` moved into
/// hosts.toml files, edited after the apply so its backup is not put
/// back: revert (and dropping containerd from the config) must give the
/// moved `registry.mirrors` and `configs.*.tls` back to config.toml along
/// with the admin's edit, since the hosts.toml files that held them go.
#[test]
fn migrated_mirrors_survive_revert_after_an_admin_edit() {
    let conf = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://mirror.example\", \"https://registry-1.docker.io\"]\n[plugins.\"io.containerd.grpc.v1.cri\".registry.configs.\"mirror.example\".tls]\n  ca_file = \"/etc/ssl/mirror.pem\"\n  insecure_skip_verify = true\n";
    let edit = |t: &Path| {
        let now = read(t, CONFIG_TOML);
        write(
            t,
            CONFIG_TOML,
            format!("oom_score = -999\n{now}").as_bytes(),
        );
    };
    let check = |t: &Path, out: &str| {
        let back = read(t, CONFIG_TOML);
        assert!(back.starts_with("oom_score = -999\n"), "{out}\n{back}");
        let info = crate::patch::containerd::inspect(Some(back.as_bytes())).unwrap();
        assert_eq!(info.mirrors, ["docker.io"], "{out}\n{back}");
        assert_eq!(info.tls_configs, ["mirror.example"], "{out}\n{back}");
        assert_eq!(info.config_path, None, "{back}");
        let doc: toml_edit::DocumentMut = back.parse().unwrap();
        let reg = &doc["plugins"]["io.containerd.grpc.v1.cri"]["registry"];
        let endpoints: Vec<&str> = reg["mirrors"]["docker.io"]["endpoint"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(
            endpoints,
            ["https://mirror.example", "https://registry-1.docker.io"]
        );
        let tls = &reg["configs"]["mirror.example"]["tls"];
        assert_eq!(tls["ca_file"].as_str(), Some("/etc/ssl/mirror.pem"));
        assert_eq!(tls["insecure_skip_verify"].as_bool(), Some(true));
    };
    let mut o = opts(&[RuntimeKind::Docker, RuntimeKind::Containerd]);
    o.migrate_containerd_mirrors = true;

    // Reverted.
    let t = tempfile::tempdir().unwrap();
    write(t.path(), CONFIG_TOML, conf.as_bytes());
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    run_apply(&root, &cfg(CONFIG), &o, &mut exec).0.unwrap();
    edit(t.path());
    let (_, out) = run_revert(&root, &mut exec);
    check(t.path(), &out);

    // containerd dropped from the config.
    let t = tempfile::tempdir().unwrap();
    write(t.path(), CONFIG_TOML, conf.as_bytes());
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    run_apply(&root, &cfg(CONFIG), &o, &mut exec).0.unwrap();
    edit(t.path());
    let (r, out) = run_apply(
        &root,
        &cfg(CONFIG),
        &opts(&[RuntimeKind::Docker]),
        &mut exec,
    );
    r.unwrap();
    check(t.path(), &out);
}

/// The config.toml the agent created (no file before) that someone then
/// extended keeps `version = 2` through revert: containerd 1.x would read
/// the rest as version 1 and ignore the CRI tables (SystemdCgroup falls
/// back to cgroupfs, pods stop starting).
#[test]
fn revert_keeps_version_in_a_created_config_toml_others_extended() {
    let t = tempfile::tempdir().unwrap();
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    apply_config(&root, &[RuntimeKind::Containerd], &mut exec)
        .0
        .unwrap();
    let created = read(t.path(), CONFIG_TOML);
    assert!(created.contains("version = 2"), "{created}");
    let theirs = "\n[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc.options]\n  SystemdCgroup = true\n";
    write(
        t.path(),
        CONFIG_TOML,
        format!("{created}{theirs}").as_bytes(),
    );

    let (_, out) = run_revert(&root, &mut exec);
    let left = read(t.path(), CONFIG_TOML);
    let info = crate::patch::containerd::inspect(Some(left.as_bytes())).unwrap();
    assert_eq!(info.version, Some(2), "{out}\n{left}");
    assert_eq!(info.config_path, None, "{left}");
    assert!(left.contains("SystemdCgroup = true"), "{left}");
    assert!(out.contains("`version = 2` kept"), "{out}");
}
