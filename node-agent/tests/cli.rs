//! The `pullthrough-agent` binary against temp `--root`s: apply, apply
//! again, dry run, status, revert to a byte-identical tree, exit codes, and
//! a real SIGHUP through a pid file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use pullthrough_testbed::net::wait_for;
use pullthrough_testbed::process::Process;

const PEM: &str = "-----BEGIN CERTIFICATE-----\nMIIBfake\n-----END CERTIFICATE-----\n";

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pullthrough-agent"))
        .args(args)
        .output()
        .expect("run pullthrough-agent")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    config: PathBuf,
}

impl Fixture {
    fn new(config: &str) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let conf_dir = tmp.path().join("conf");
        fs::create_dir_all(root.join("etc/docker")).unwrap();
        // Every host has /run; the node lock lives there.
        fs::create_dir_all(root.join("run")).unwrap();
        fs::create_dir_all(&conf_dir).unwrap();
        fs::write(
            root.join("etc/hosts"),
            "127.0.0.1\tlocalhost\n::1\tlocalhost # v6",
        )
        .unwrap();
        fs::write(
            root.join("etc/docker/daemon.json"),
            "{\n  \"debug\": true,\n  \"log-opts\": {\"max-size\": \"10m\"}\n}\n",
        )
        .unwrap();
        fs::write(conf_dir.join("ca.crt"), PEM).unwrap();
        let config_path = conf_dir.join("agent.yaml");
        fs::write(&config_path, config).unwrap();
        Self {
            _tmp: tmp,
            root,
            config: config_path,
        }
    }

    fn root(&self) -> &str {
        self.root.to_str().unwrap()
    }

    fn config(&self) -> &str {
        self.config.to_str().unwrap()
    }

    fn read(&self, p: &str) -> String {
        fs::read_to_string(self.root.join(p)).unwrap()
    }
}

const CONFIG: &str = "
proxy:
  address: 10.0.0.5
  caFile: ca.crt            # relative to this file
  neverHijack: [ghcr.io]
registries:
  - host: docker.io
    upstream: https://registry-1.docker.io
  - host: quay.io
  - host: ghcr.io
";

#[test]
fn apply_again_status_and_revert_to_a_byte_identical_tree() {
    let f = Fixture::new(CONFIG);
    let before = common::snapshot(&f.root);

    let o = agent(&["apply", "--root", f.root(), "--config", f.config()]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    assert!(out.contains("docker: detected (/etc/docker)"), "{out}");
    assert!(out.contains("docker: ghcr.io: not hijacked"), "{out}");
    assert!(out.contains("updated   /etc/hosts"), "{out}");
    assert!(out.contains("updated   /etc/docker/daemon.json"), "{out}");
    assert!(
        out.contains("created   /etc/docker/certs.d/quay.io/pullthrough-ca.crt"),
        "{out}"
    );
    // No dockerd runs under the temp root: said, not failed.
    assert!(out.contains("dockerd: reload (SIGHUP)"), "{out}");
    assert!(out.contains("not running"), "{out}");
    let hosts = f.read("etc/hosts");
    assert!(
        hosts.starts_with("127.0.0.1\tlocalhost\n::1\tlocalhost # v6\n# >>> pullthrough-agent"),
        "{hosts}"
    );
    assert!(hosts.contains("10.0.0.5\tquay.io\n"), "{hosts}");
    assert!(!hosts.contains("ghcr.io"), "{hosts}");
    // The file had no final newline; the block still ends with one (a
    // line appended later is a line of its own), and revert gives the
    // file back without it.
    assert!(hosts.ends_with("# <<< pullthrough-agent <<<\n"), "{hosts}");
    let dj: serde_json::Value = serde_json::from_str(&f.read("etc/docker/daemon.json")).unwrap();
    assert_eq!(
        dj["registry-mirrors"],
        serde_json::json!(["https://10.0.0.5"])
    );
    assert_eq!(
        dj.as_object().unwrap().keys().collect::<Vec<_>>(),
        ["debug", "log-opts", "registry-mirrors"]
    );

    let applied = common::snapshot(&f.root);
    let o = agent(&[
        "apply",
        "--root",
        f.root(),
        "--config",
        f.config(),
        "--runtime",
        "docker",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert_eq!(stdout.lines().last(), Some("no changes"), "{stdout}");
    assert_eq!(common::snapshot(&f.root), applied);

    let o = agent(&["status", "--root", f.root()]);
    assert!(o.status.success());
    let table = text(&o);
    assert!(table.contains("FILE"), "{table}");
    assert!(table.contains("/etc/docker/daemon.json"), "{table}");
    assert!(table.contains("applied"), "{table}");
    let o = agent(&["status", "--root", f.root(), "--output", "json"]);
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["applied"], true);
    assert_eq!(st["lastApply"]["proxy"], "https://10.0.0.5");
    assert_eq!(st["hostsEntries"], serde_json::json!(["10.0.0.5 quay.io"]));

    let o = agent(&["revert", "--root", f.root(), "--reload-settle", "0s"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("restored  /etc/hosts"), "{}", text(&o));
    assert_eq!(common::snapshot(&f.root), before);

    let o = agent(&["status", "--root", f.root(), "--output", "json"]);
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(st["applied"], false);
}

#[test]
fn dry_run_prints_a_diff_and_writes_nothing() {
    let f = Fixture::new(CONFIG);
    let before = common::snapshot(&f.root);
    let o = agent(&[
        "apply",
        "--root",
        f.root(),
        "--config",
        f.config(),
        "--dry-run",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("--- a/etc/docker/daemon.json"), "{out}");
    assert!(out.contains("+  \"registry-mirrors\": ["), "{out}");
    assert!(
        out.contains("+++ b/etc/docker/certs.d/10.0.0.5/pullthrough-ca.crt"),
        "{out}"
    );
    assert!(out.contains("dry run: nothing was written"), "{out}");
    assert_eq!(common::snapshot(&f.root), before);
}

#[test]
fn bad_args_and_bad_config_exit_64_and_touch_nothing() {
    let f = Fixture::new(CONFIG);
    let before = common::snapshot(&f.root);
    let cases: Vec<Vec<&str>> = vec![
        vec![],
        vec!["apply", "--root", f.root()],
        vec![
            "apply",
            "--root",
            f.root(),
            "--config",
            f.config(),
            "--runtime",
            "rkt",
        ],
        vec![
            "apply",
            "--root",
            f.root(),
            "--config",
            f.config(),
            "--runtime",
            "auto,docker",
        ],
        vec![
            "apply",
            "--root",
            f.root(),
            "--config",
            "/nonexistent/agent.yaml",
        ],
    ];
    for args in cases {
        let o = agent(&args);
        assert_eq!(o.status.code(), Some(64), "{args:?}: {}", text(&o));
    }
    for (yaml, needle) in [
        ("registries: [{host: quay.io}]\n", "proxy: missing"),
        (
            "proxy: {address: 10.0.0.5, caFile: ca.crt}\nregistries: [{host: Quay.io}]\n",
            "registries[0].host",
        ),
        (
            "proxy: {address: 10.0.0.5, caFile: missing.crt}\n",
            "proxy.caFile",
        ),
        (
            "proxy: {address: 10.0.0.5, caFile: ca.crt, port: 1}\n",
            "port",
        ),
        (
            "proxy: {address: 10.0.0.5, caFile: ca.crt, httpsPort: 5443}\nregistries: [{host: quay.io}]\n",
            "port 443",
        ),
    ] {
        fs::write(&f.config, yaml).unwrap();
        let o = agent(&["apply", "--root", f.root(), "--config", f.config()]);
        assert_eq!(o.status.code(), Some(64), "{yaml}: {}", text(&o));
        assert!(text(&o).contains(needle), "{yaml}: {}", text(&o));
    }
    assert_eq!(common::snapshot(&f.root), before);
}

#[test]
fn broken_files_fail_with_the_path_and_stay_untouched() {
    let f = Fixture::new(CONFIG);
    fs::write(f.root.join("etc/docker/daemon.json"), "{\"debug\": tru}").unwrap();
    let before = common::snapshot(&f.root);
    let o = agent(&["apply", "--root", f.root(), "--config", f.config()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("/etc/docker/daemon.json: is not valid JSON"),
        "{}",
        text(&o)
    );
    assert_eq!(common::snapshot(&f.root), before);
}

#[test]
fn run_without_a_node_name_or_config_file_exits_64() {
    let o = Command::new(env!("CARGO_BIN_EXE_pullthrough-agent"))
        .args(["run", "--root", "/nonexistent"])
        .env_remove("NODE_NAME")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("--node-name"), "{}", text(&o));
}

/// A process named `dockerd` (a copy of `sleep`) with its pid in the
/// root's `/var/run/docker.pid` receives the agent's SIGHUP.
#[test]
fn reload_signals_dockerd_through_its_pid_file() {
    let f = Fixture::new(CONFIG);
    let sleep = ["/bin/sleep", "/usr/bin/sleep"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("sleep binary");
    let fake = f.root.parent().unwrap().join("dockerd");
    fs::copy(sleep, &fake).unwrap();
    let mut fake_cmd = Command::new(&fake);
    fake_cmd.arg("60");
    // Stopped by PID when dropped, also when an assert below fails.
    let mut child = Process::spawn(
        "dockerd",
        fake_cmd,
        f.root.parent().unwrap().join("dockerd.log"),
    )
    .unwrap();
    fs::create_dir_all(f.root.join("var/run")).unwrap();
    fs::write(
        f.root.join("var/run/docker.pid"),
        format!("{}\n", child.pid()),
    )
    .unwrap();

    let o = agent(&[
        "apply",
        "--root",
        f.root(),
        "--config",
        f.config(),
        "--runtime",
        "docker",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains(&format!(
            "sent SIGHUP to dockerd (pid {} from /var/run/docker.pid)",
            child.pid()
        )),
        "{}",
        text(&o)
    );
    wait_for("the fake dockerd to exit", Duration::from_secs(10), || {
        Ok(child.check_running().is_err())
    })
    .expect("fake dockerd got no signal");
    // It has exited: this only reaps it and reads its status.
    let status = child.stop().unwrap().unwrap();
    assert_eq!(
        status.signal(),
        Some(nix::sys::signal::Signal::SIGHUP as i32)
    );
}

/// `run` (docker, and `extra` flags) on the fixture's tree, once its first
/// apply is recorded.
fn running_agent(f: &Fixture, extra: &[&str]) -> Process {
    let dir = f.root.parent().unwrap().to_path_buf();
    let mut run = Command::new(env!("CARGO_BIN_EXE_pullthrough-agent"));
    run.args([
        "run",
        "--root",
        f.root(),
        "--config-file",
        f.config(),
        "--runtime",
        "docker",
    ])
    .args(extra);
    let mut running = Process::spawn("agent", run, dir.join("agent.log")).unwrap();
    running
        .wait_ready("the agent's first apply", Duration::from_secs(20), || {
            Ok(
                fs::read_to_string(f.root.join("var/lib/pullthrough-agent/state.json"))
                    .is_ok_and(|s| s.contains("lastApply")),
            )
        })
        .unwrap();
    running
}

/// `helm uninstall` starts the revert while the old agent pod may still be
/// in its grace period, and that loop re-applies when the proxy goes away.
/// So `revert` waits for a running agent to exit (the node lock), and
/// refuses, touching nothing, when it does not exit in time.
#[test]
fn revert_waits_for_the_running_agent_to_exit() {
    let f = Fixture::new(CONFIG);
    let before = common::snapshot(&f.root);
    let dir = f.root.parent().unwrap().to_path_buf();
    let bin = env!("CARGO_BIN_EXE_pullthrough-agent");
    let mut running = running_agent(&f, &[]);
    let applied = common::snapshot(&f.root);

    // Not in time: refused, nothing reverted.
    let o = agent(&["revert", "--root", f.root(), "--wait-for-agent", "300ms"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("another pullthrough-agent still runs on this node"),
        "{}",
        text(&o)
    );
    assert!(
        text(&o).contains("/run/pullthrough-agent.lock"),
        "{}",
        text(&o)
    );
    assert_eq!(common::snapshot(&f.root), applied);

    // Waiting: the revert starts only once the agent is gone.
    let mut revert = Command::new(bin);
    revert.args([
        "revert",
        "--root",
        f.root(),
        "--reload-settle",
        "0s",
        "--wait-for-agent",
        "60s",
    ]);
    let revert_log = dir.join("revert.log");
    let mut revert = Process::spawn("revert", revert, &revert_log).unwrap();
    revert
        .wait_ready("the revert to wait", Duration::from_secs(20), || {
            Ok(fs::read_to_string(&revert_log)
                .unwrap_or_default()
                .contains("waiting up to"))
        })
        .unwrap();
    assert_eq!(
        common::snapshot(&f.root),
        applied,
        "nothing reverted while the agent runs"
    );
    let status = running.stop().unwrap().unwrap();
    assert!(status.success(), "{status:?}: {}", running.log());
    wait_for("the revert to finish", Duration::from_secs(20), || {
        Ok(revert.check_running().is_err())
    })
    .unwrap();
    let log = revert.log();
    assert!(log.contains("restored  /etc/hosts"), "{log}");
    common::assert_same_tree(&before, &common::snapshot(&f.root));
}

/// The node lock is the kernel's `flock`, not the file: an agent killed
/// with SIGKILL (no destructor runs, its lock file stays behind) leaves
/// no stale lock, and the next `revert` takes it at once.
#[test]
fn a_sigkilled_agent_leaves_no_stale_lock() {
    let f = Fixture::new(CONFIG);
    let before = common::snapshot(&f.root);
    let mut running = running_agent(&f, &[]);
    let revert = || {
        agent(&[
            "revert",
            "--root",
            f.root(),
            "--reload-settle",
            "0s",
            "--wait-for-agent",
            "0s",
        ])
    };
    // Held while it runs.
    let o = revert();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("another pullthrough-agent still runs on this node"),
        "{}",
        text(&o)
    );

    let status = running.kill().unwrap().unwrap();
    assert_eq!(
        status.signal(),
        Some(nix::sys::signal::Signal::SIGKILL as i32)
    );
    assert!(
        f.root.join("run/pullthrough-agent.lock").exists(),
        "SIGKILL leaves the lock file behind"
    );
    // Free at once: no wait allowed.
    let o = revert();
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("restored  /etc/hosts"), "{}", text(&o));
    // The revert took the leftover file over and removed it with the rest.
    common::assert_same_tree(&before, &common::snapshot(&f.root));
}

/// SIGTERM and SIGINT stop `run` without reverting, also when the signal
/// lands while the loop is busy (here: a readiness probe the proxy never
/// answers) rather than waiting for its next tick.
#[test]
fn run_stops_on_sigterm_and_sigint_without_reverting() {
    use nix::sys::signal::Signal;
    use std::net::TcpListener;

    for sig in [Signal::SIGTERM, Signal::SIGINT] {
        // Accepts probes and never answers them.
        let ready = TcpListener::bind("127.0.0.1:0").unwrap();
        ready.set_nonblocking(true).unwrap();
        let f = Fixture::new(&CONFIG.replace(
            "  caFile: ca.crt",
            &format!(
                "  readyUrl: http://{}/readyz\n  caFile: ca.crt",
                ready.local_addr().unwrap()
            ),
        ));
        let mut running =
            running_agent(&f, &["--probe-interval", "100ms", "--probe-timeout", "2s"]);
        let mut applied = common::snapshot(&f.root);
        // The lock file goes with its holder.
        assert!(
            applied
                .remove(Path::new("run/pullthrough-agent.lock"))
                .is_some()
        );
        // A probe after the apply is in flight: its connection is accepted
        // and held unanswered (the earlier ones are dropped first).
        let mut held = Vec::new();
        while let Ok((s, _)) = ready.accept() {
            drop(s);
        }
        running
            .wait_ready(
                "a probe in flight",
                Duration::from_secs(20),
                || match ready.accept() {
                    Ok((s, _)) => {
                        held.push(s);
                        Ok(true)
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
                    Err(e) => panic!("accept: {e}"),
                },
            )
            .unwrap();

        running.signal(sig).unwrap();
        wait_for(
            &format!("the agent to stop on {sig}"),
            Duration::from_secs(15),
            || Ok(running.check_running().is_err()),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", running.log()));
        // It has exited: this only reaps it and reads its status.
        let status = running.stop().unwrap().unwrap();
        let log = running.log();
        assert!(status.success(), "{sig}: {status:?}: {log}");
        assert!(
            log.contains(&format!("{}: stopping", sig.as_str())),
            "{log}"
        );
        common::assert_same_tree(&applied, &common::snapshot(&f.root));
    }
}
