//! dockerd: daemon.json checks and the daemon actions an apply owes.

use super::*;

#[test]
fn invalid_daemon_json_is_refused_and_nothing_is_written() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), HOSTS, b"127.0.0.1 localhost\n");
    write(t.path(), DAEMON_JSON, b"{\"debug\": true,}\n");
    let before = snapshot(t.path());
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    let (r, _) = apply_config(&root, &[RuntimeKind::Docker], &mut exec);
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
    let (r, _) = apply_config(&root, &[RuntimeKind::Docker], &mut exec);
    assert!(r.unwrap_err().to_string().contains("dockerd --validate"));
    assert_eq!(snapshot(t.path()), before);
}

/// A running dockerd under the root: its pid file and the command line
/// `/proc/<pid>/cmdline` holds (NUL-separated, NUL-terminated).
fn fake_dockerd(root: &Path, pid_file: &str, pid: u32, argv: &[&str]) {
    write(root, pid_file, format!("{pid}\n").as_bytes());
    let mut cmdline = Vec::new();
    for a in argv {
        cmdline.extend_from_slice(a.as_bytes());
        cmdline.push(0);
    }
    write(root, &format!("/proc/{pid}/cmdline"), &cmdline);
}

/// dockerd refuses a daemon.json setting a key its command line sets
/// (minikube runs it with `--insecure-registry 10.96.0.0/12`), and
/// `dockerd --validate` does not see the unit's flags: the agent must not
/// write such a key, and leaves every file as it was.
#[test]
fn a_daemon_json_key_dockerd_has_as_a_flag_is_refused_and_nothing_is_written() {
    let plain_http = || {
        let mut c =
            cfg("proxy: {address: 10.0.0.5, httpPort: 80}\nregistries: [{host: quay.io}]\n");
        c.ca_pem = None;
        c
    };
    for (config, argv, flag, key) in [
        (
            plain_http(),
            &[
                "/usr/bin/dockerd",
                "-H",
                "fd://",
                "--insecure-registry",
                "10.96.0.0/12",
            ][..],
            "--insecure-registry",
            "insecure-registries",
        ),
        (
            cfg(CONFIG),
            &["dockerd", "--registry-mirror=https://mirror.gcr.io"][..],
            "--registry-mirror",
            "registry-mirrors",
        ),
    ] {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), HOSTS, b"127.0.0.1 localhost\n");
        write(t.path(), DAEMON_JSON, b"{\"debug\": true}\n");
        fake_dockerd(t.path(), "/run/docker.pid", 4242, argv);
        let before = snapshot(t.path());
        let root = Root::new(t.path());
        let mut exec = RecordingExecutor::default();
        let (r, out) = run_apply(&root, &config, &opts(&[RuntimeKind::Docker]), &mut exec);
        let e = r.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "/etc/docker/daemon.json: dockerd (pid 4242 in /run/docker.pid) runs with {flag}, and dockerd refuses a daemon.json that also sets `{key}`"
            )),
            "{e}"
        );
        assert!(e.contains("nothing was written"), "{e}");
        assert!(
            e.contains(&format!("Drop {flag} from dockerd's unit")),
            "{e}"
        );
        assert_eq!(snapshot(t.path()), before, "{out}");
        assert!(exec.calls.is_empty(), "{:?}", exec.calls);
    }
}

/// A dockerd that is not running has its flags read from how it would
/// start: its unit's ExecStart (drop-ins included, as `systemctl show`
/// gives it), the files its unit reads its environment from, and
/// `/etc/default/docker` and the like without systemd. A conflicting flag
/// there is refused as a running dockerd's is, and nothing is written.
#[test]
fn a_stopped_dockerds_flags_are_read_from_its_unit_and_environment_files() {
    let plain_http = || {
        let mut c =
            cfg("proxy: {address: 10.0.0.5, httpPort: 80}\nregistries: [{host: quay.io}]\n");
        c.ca_pem = None;
        c
    };
    let unit = |argv: &str, files: &str| {
        Some(Ok(format!(
            "ExecStart={{ path=/usr/bin/dockerd ; argv[]={argv} ; ignore_errors=no ; start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }}\nEnvironment=\n{files}"
        )))
    };
    for (config, unit_start, env_file, found, key) in [
        (
            plain_http(),
            unit(
                "/usr/bin/dockerd -H fd:// --insecure-registry 10.96.0.0/12",
                "",
            ),
            None,
            "docker.service's ExecStart would start it with --insecure-registry",
            "insecure-registries",
        ),
        (
            cfg(CONFIG),
            unit(
                "/usr/bin/dockerd $OPTS",
                "EnvironmentFiles=/etc/docker/dockerd.env (ignore_errors=yes)\n",
            ),
            Some((
                "/etc/docker/dockerd.env",
                "OPTS=\"--registry-mirror=https://mirror.gcr.io\"\n",
            )),
            "/etc/docker/dockerd.env would start it with --registry-mirror",
            "registry-mirrors",
        ),
        (
            cfg(CONFIG),
            None,
            Some((
                "/etc/default/docker",
                "DOCKER_OPTS=\"--registry-mirror https://mirror.gcr.io\"\n",
            )),
            "/etc/default/docker would start it with --registry-mirror",
            "registry-mirrors",
        ),
    ] {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), HOSTS, b"127.0.0.1 localhost\n");
        write(t.path(), DAEMON_JSON, b"{\"debug\": true}\n");
        if let Some((path, text)) = env_file {
            write(t.path(), path, text.as_bytes());
        }
        let before = snapshot(t.path());
        let root = Root::new(t.path());
        let mut exec = RecordingExecutor {
            unit_start,
            ..Default::default()
        };
        let (r, out) = run_apply(&root, &config, &opts(&[RuntimeKind::Docker]), &mut exec);
        let e = r.unwrap_err().to_string();
        assert!(
            e.starts_with(&format!(
                "/etc/docker/daemon.json: dockerd is not running, and {found}, and dockerd refuses a daemon.json that also sets `{key}`"
            )),
            "{e}"
        );
        assert_eq!(snapshot(t.path()), before, "{out}");
    }
}

/// When a stopped dockerd's unit cannot be read (`systemctl show`
/// fails), no key daemon.json lacks is added; one it already has cannot
/// conflict (dockerd started with it), so that file is still managed.
#[test]
fn a_stopped_dockerd_with_unknown_flags_gets_no_new_key() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), DAEMON_JSON, b"{\"debug\": true}\n");
    let before = snapshot(t.path());
    let root = Root::new(t.path());
    let failing = || RecordingExecutor {
        unit_start: Some(Err("Failed to connect to bus".into())),
        ..Default::default()
    };
    let mut exec = failing();
    let (r, out) = apply_config(&root, &[RuntimeKind::Docker], &mut exec);
    let e = r.unwrap_err();
    assert!(
        matches!(&e, AgentError::DockerdFlagsUnknown { key, .. } if *key == "registry-mirrors"),
        "{e}\n{out}"
    );
    assert!(e.to_string().contains("Failed to connect to bus"), "{e}");
    assert_eq!(snapshot(t.path()), before, "{out}");

    write(
        t.path(),
        DAEMON_JSON,
        b"{\"debug\": true, \"registry-mirrors\": [\"https://m.example\"]}\n",
    );
    let mut exec = failing();
    let (r, out) = apply_config(&root, &[RuntimeKind::Docker], &mut exec);
    r.unwrap_or_else(|e| panic!("{e}\n{out}"));
    let dj: serde_json::Value = serde_json::from_str(&read(t.path(), DAEMON_JSON)).unwrap();
    assert_eq!(
        dj["registry-mirrors"],
        serde_json::json!(["https://10.0.0.5", "https://m.example"])
    );
}

/// Only a key the agent writes conflicts (TLS mode writes no
/// `insecure-registries`), and a stale pid file whose process is not
/// dockerd says nothing about dockerd's flags.
#[test]
fn dockerd_flags_the_agent_does_not_write_or_a_stale_pid_file_do_not_stop_the_apply() {
    for argv in [
        &["/usr/bin/dockerd", "--insecure-registry=10.96.0.0/12"][..],
        &["/bin/sleep", "--registry-mirror", "https://mirror.gcr.io"][..],
    ] {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), DAEMON_JSON, b"{\"debug\": true}\n");
        fake_dockerd(t.path(), "/var/run/docker.pid", 4242, argv);
        let root = Root::new(t.path());
        let mut exec = RecordingExecutor::default();
        let (r, out) = apply_config(&root, &[RuntimeKind::Docker], &mut exec);
        r.unwrap_or_else(|e| panic!("{argv:?}: {e}\n{out}"));
        let dj: serde_json::Value = serde_json::from_str(&read(t.path(), DAEMON_JSON)).unwrap();
        assert_eq!(
            dj,
            serde_json::json!({"debug": true, "registry-mirrors": ["https://10.0.0.5"]}),
            "{argv:?}"
        );
    }
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

/// A restart owed since an earlier apply follows the admin's current
/// `--docker-action`: dropped under `none`, a reload under `reload`.
#[test]
fn an_owed_docker_restart_obeys_the_current_docker_action() {
    for (arg, calls, said) in [
        (
            DockerActionArg::None,
            &[][..],
            "dockerd: owed restart not done: --docker-action none",
        ),
        (
            DockerActionArg::Reload,
            &["reload docker"][..],
            "--docker-action reload: a reload instead of the owed restart",
        ),
    ] {
        let t = tempfile::tempdir().unwrap();
        write(t.path(), DAEMON_JSON, b"{\"debug\": true}\n");
        let root = Root::new(t.path());
        let mut o = opts(&[RuntimeKind::Docker]);
        o.docker_action = DockerActionArg::Restart;
        let mut exec = RecordingExecutor {
            fail: 1,
            ..Default::default()
        };
        let (r, out) = run_apply(&root, &cfg(CONFIG), &o, &mut exec);
        assert!(r.is_err(), "{out}");
        assert_eq!(status(&root).unwrap().pending_actions.len(), 1, "{out}");

        o.docker_action = arg;
        let mut exec = RecordingExecutor::default();
        let (r, out) = run_apply(&root, &cfg(CONFIG), &o, &mut exec);
        r.unwrap();
        assert_eq!(exec.calls, calls, "{arg:?}: {out}");
        assert!(out.contains(said), "{arg:?}: {out}");
        assert!(status(&root).unwrap().pending_actions.is_empty(), "{arg:?}");
        // Not owed any more: the next apply is quiet.
        let (_, out) = run_apply(&root, &cfg(CONFIG), &o, &mut exec);
        assert_eq!(out.trim(), "no changes", "{arg:?}");
    }
}

/// `systemctl restart docker` stops the agent's own pod on a cri-dockerd
/// node before the agent can record that it succeeded: the agent that
/// comes up next must not restart dockerd again (and be stopped again).
#[test]
fn a_restart_that_stopped_the_agent_is_not_repeated() {
    let (_dir, root, o) = a_restart_stops_the_agent();

    let mut exec = RecordingExecutor::default();
    let (r, out) = run_apply(&root, &cfg(CONFIG), &o, &mut exec);
    r.unwrap();
    assert!(exec.calls.is_empty(), "{out}");
    assert!(out.contains("not repeated"), "{out}");
    assert!(status(&root).unwrap().pending_actions.is_empty());
    let (_, out) = run_apply(&root, &cfg(CONFIG), &o, &mut exec);
    assert_eq!(out.trim(), "no changes");
    assert!(exec.calls.is_empty());
}

/// dockerd's SIGHUP applies only keys present in daemon.json: when an
/// apply drops `insecure-registries` (the proxy moved from plain HTTP to
/// TLS), dockerd must first read it emptied, or it keeps trusting the
/// names over plain HTTP until its next restart.
#[test]
fn a_key_an_apply_removes_is_cleared_in_dockerd() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), DAEMON_JSON, b"{\"debug\": true}\n");
    let root = Root::new(t.path());
    let o = opts(&[RuntimeKind::Docker]);
    let mut http = cfg("proxy: {address: 10.0.0.5, httpPort: 80}\nregistries: [{host: quay.io}]\n");
    http.ca_pem = None;
    let mut exec = RecordingExecutor::default();
    run_apply(&root, &http, &o, &mut exec).0.unwrap();
    assert!(read(t.path(), DAEMON_JSON).contains("insecure-registries"));

    let mut exec = SeesDaemonJson {
        file: t.path().join("etc/docker/daemon.json"),
        seen: Vec::new(),
    };
    let mut out = Vec::new();
    apply(&root, &cfg(CONFIG), &o, &mut exec, &mut out).unwrap();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(
        exec.seen,
        [Some(serde_json::json!({
            "debug": true,
            "registry-mirrors": ["https://10.0.0.5"],
            "insecure-registries": [],
        }))],
        "{out}"
    );
    let dj: serde_json::Value = serde_json::from_str(&read(t.path(), DAEMON_JSON)).unwrap();
    assert_eq!(
        dj,
        serde_json::json!({"debug": true, "registry-mirrors": ["https://10.0.0.5"]}),
        "{out}"
    );
    assert_eq!(
        status(&root)
            .unwrap()
            .files
            .iter()
            .filter(|f| f.state != "applied")
            .count(),
        0
    );
}

/// A restart an agent began and did not see end (it may have stopped the
/// agent) is not repeated: `status` says so, not that it is retried.
#[test]
fn status_says_a_begun_restart_is_not_repeated() {
    let (_dir, root, _) = a_restart_stops_the_agent();

    let table = status_table(&status(&root).unwrap());
    let line = table
        .lines()
        .find(|l| l.contains("pending: docker restart"))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(!line.contains("retried"), "{line}");
    assert!(
        line.ends_with("begun by an earlier agent that did not see it end: not repeated, the next apply drops it"),
        "{line}"
    );

    // One that failed is retried.
    let t = tempfile::tempdir().unwrap();
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor {
        fail: 1,
        ..Default::default()
    };
    let (r, _) = apply_config(&root, &[RuntimeKind::Containerd], &mut exec);
    assert!(r.is_err());
    let table = status_table(&status(&root).unwrap());
    assert!(
        table.contains("pending: containerd restart (config_path enabled in config.toml): failed, retried on the next apply\n"),
        "{table}"
    );
}

/// An apply with `--docker-action restart` whose restart stops the agent
/// itself (the executor panics where the process would die): the node's
/// dir, its root and the options used.
fn a_restart_stops_the_agent() -> (tempfile::TempDir, Root, ApplyOptions) {
    use crate::error::ExecError;
    use crate::runtime::{Outcome, Service};
    struct StopsTheAgent;
    impl Executor for StopsTheAgent {
        fn reload(&mut self, _: Service) -> Result<Outcome, ExecError> {
            unreachable!("no reload here")
        }
        fn restart(&mut self, _: Service) -> Result<Outcome, ExecError> {
            panic!("the restart stopped the agent");
        }
        fn validate_daemon_json(&mut self, _: &[u8]) -> Option<Result<(), Rejected>> {
            None
        }
    }
    let t = tempfile::tempdir().unwrap();
    write(t.path(), DAEMON_JSON, b"{\"debug\": true}\n");
    let root = Root::new(t.path());
    let mut o = opts(&[RuntimeKind::Docker]);
    o.docker_action = DockerActionArg::Restart;
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        apply(&root, &cfg(CONFIG), &o, &mut StopsTheAgent, &mut Vec::new())
    }));
    assert!(stopped.is_err());
    (t, root, o)
}
