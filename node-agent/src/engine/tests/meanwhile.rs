//! Another writer between the agent's read of a file and its write, in
//! the windows commit's own check does not cover: revert (which reads
//! every file, then may wait for dockerd through an interim daemon.json)
//! and an apply's reload through an interim daemon.json.

use super::*;
use crate::error::ExecError;
use crate::runtime::{Action, Interim, Outcome, Service, Step};

/// An executor whose dockerd reload comes with someone else's writes (an
/// admin's editor during the settle time), done once.
struct EditsOnReload {
    root: std::path::PathBuf,
    edits: Vec<(&'static str, String)>,
    calls: Vec<String>,
}

impl Executor for EditsOnReload {
    fn reload(&mut self, s: Service) -> Result<Outcome, ExecError> {
        self.calls.push(format!("reload {}", s.unit()));
        for (path, bytes) in self.edits.drain(..) {
            write(&self.root, path, bytes.as_bytes());
        }
        Ok(Outcome::Done("recorded".into()))
    }
    fn restart(&mut self, s: Service) -> Result<Outcome, ExecError> {
        panic!("no restart of {s:?} expected")
    }
    fn validate_daemon_json(&mut self, _: &[u8]) -> Option<Result<(), Rejected>> {
        None
    }
}

/// Revert reloads dockerd through an interim daemon.json and waits; an
/// admin edits daemon.json and /etc/hosts meanwhile. Both keep their
/// edit (with the agent's record and backup, named in the error), every
/// other file is reverted, and a second revert finishes from their
/// content.
#[test]
fn revert_keeps_edits_made_while_dockerd_reloads() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), HOSTS, b"127.0.0.1 localhost\n");
    write(t.path(), DAEMON_JSON, b"{\"debug\": true}\n");
    let root = Root::new(t.path());
    let mut exec = RecordingExecutor::default();
    apply_config(&root, &[RuntimeKind::Docker], &mut exec)
        .0
        .unwrap();
    let their_hosts = format!("{}10.1.1.1 theirs.example\n", read(t.path(), HOSTS));
    let their_dj = "{\"debug\": false, \"registry-mirrors\": [\"https://10.0.0.5\"]}\n";

    let mut exec = EditsOnReload {
        root: t.path().to_path_buf(),
        edits: vec![(DAEMON_JSON, their_dj.into()), (HOSTS, their_hosts.clone())],
        calls: Vec::new(),
    };
    let mut out = Vec::new();
    let err = revert(&root, &revert_opts(), &mut exec, &mut out).unwrap_err();
    let out = String::from_utf8(out).unwrap();
    assert_eq!(exec.calls, ["reload docker"], "{out}");
    let AgentError::RevertIncomplete { failed } = &err else {
        panic!("{err}\n{out}");
    };
    let mut left: Vec<&str> = failed
        .iter()
        .map(|e| match e {
            AgentError::ChangedDuringRevert { path } => path.as_str(),
            other => panic!("{other}"),
        })
        .collect();
    left.sort();
    assert_eq!(left, [DAEMON_JSON, HOSTS], "{out}");
    assert_eq!(read(t.path(), DAEMON_JSON), their_dj, "{out}");
    assert_eq!(read(t.path(), HOSTS), their_hosts, "{out}");
    assert!(!t.path().join("etc/docker/certs.d").exists(), "{out}");
    let st = state::load(&root).unwrap().unwrap();
    assert_eq!(
        st.files.keys().map(String::as_str).collect::<Vec<_>>(),
        [DAEMON_JSON, HOSTS]
    );

    let mut exec = RecordingExecutor::default();
    let (_, out) = run_revert(&root, &mut exec);
    assert_eq!(
        read(t.path(), HOSTS),
        "127.0.0.1 localhost\n10.1.1.1 theirs.example\n",
        "{out}"
    );
    let dj: serde_json::Value = serde_json::from_str(&read(t.path(), DAEMON_JSON)).unwrap();
    assert_eq!(dj, serde_json::json!({"debug": false}), "{out}");
    assert!(state::load(&root).unwrap().is_none());
}

/// An apply reloads dockerd through an interim daemon.json (the proxy
/// moved from plain HTTP to TLS: `insecure-registries` goes) and an admin
/// edits the file during the settle time: their edit stays, the apply
/// fails naming the file, and the reload stays owed.
#[test]
fn an_apply_keeps_an_edit_made_while_dockerd_reloads() {
    let t = tempfile::tempdir().unwrap();
    write(t.path(), DAEMON_JSON, b"{\"debug\": true}\n");
    let root = Root::new(t.path());
    let o = opts(&[RuntimeKind::Docker]);
    let mut http = cfg("proxy: {address: 10.0.0.5, httpPort: 80}\nregistries: [{host: quay.io}]\n");
    http.ca_pem = None;
    let mut exec = RecordingExecutor::default();
    run_apply(&root, &http, &o, &mut exec).0.unwrap();

    let theirs = "{\"debug\": false, \"insecure-registries\": []}\n";
    let mut exec = EditsOnReload {
        root: t.path().to_path_buf(),
        edits: vec![(DAEMON_JSON, theirs.into())],
        calls: Vec::new(),
    };
    let mut out = Vec::new();
    let err = apply(&root, &cfg(CONFIG), &o, &mut exec, &mut out).unwrap_err();
    let out = String::from_utf8(out).unwrap();
    assert!(
        matches!(&err, AgentError::ChangedDuringReload { path } if path == DAEMON_JSON),
        "{err}\n{out}"
    );
    assert_eq!(read(t.path(), DAEMON_JSON), theirs, "{out}");
    let st = state::load(&root).unwrap().unwrap();
    assert!(
        st.pending_actions
            .iter()
            .any(|p| p.service == "docker" && p.action == "reload"),
        "{:?}",
        st.pending_actions
    );
}

/// The interim is not written, nor the daemon told, over an edit made
/// between the apply's write and its reload.
#[test]
fn an_interim_daemon_json_is_not_written_over_an_edit_made_after_the_apply() {
    let t = tempfile::tempdir().unwrap();
    let root = Root::new(t.path());
    write(t.path(), DAEMON_JSON, b"{\"debug\": false}\n");
    let step = Step {
        service: Service::Docker,
        action: Action::Reload,
        reason: "r".into(),
        dry_run_reason: None,
        interim: Some(Interim {
            path: DAEMON_JSON.into(),
            bytes: b"{\"debug\": true, \"insecure-registries\": []}\n".to_vec(),
            after: Some(b"{\"debug\": true}\n".to_vec()),
        }),
    };
    let mut exec = RecordingExecutor::default();
    let mut out = Vec::new();
    let mut actor = Actor::new(&mut exec, &mut out);
    let err = actor
        .act_after_apply(&root, &step, Duration::ZERO)
        .unwrap_err();
    assert!(
        matches!(&err, AgentError::ChangedDuringReload { path } if path == DAEMON_JSON),
        "{err}"
    );
    drop(actor);
    assert!(exec.calls.is_empty(), "{:?}", exec.calls);
    assert_eq!(read(t.path(), DAEMON_JSON), "{\"debug\": false}\n");
}
