//! dockerd: a marker block in `/etc/hosts` for the hijacked registries,
//! `registry-mirrors`/`insecure-registries` in daemon.json, the proxy CA in
//! `/etc/docker/certs.d`; then a reload, a restart or nothing, as the
//! changed keys and `--docker-action` allow.

use std::collections::BTreeSet;

use super::{
    Action, AfterApply, BeforeRevert, Executor, Interim, PlanInput, Planned, Runtime, RuntimeKind,
    Service, Step,
};
use crate::desired;
use crate::engine::plan::{Change, Planner};
use crate::error::AgentError;
use crate::fsio::Root;
use crate::patch::daemon_json::{
    self, Added, DOCKERD_FLAGS, DaemonJsonWant, INSECURE_REGISTRIES, REGISTRY_MIRRORS,
};
use crate::patch::docker_certs::{self, DOCKER_CERTS_D};
use crate::patch::hosts;
use crate::state::FileKind;

/// `/etc/hosts`.
pub const HOSTS: &str = "/etc/hosts";
/// dockerd's config.
pub const DAEMON_JSON: &str = "/etc/docker/daemon.json";
/// dockerd's pid files, as the executor signals it through them.
const PID_FILES: [&str; 2] = ["/var/run/docker.pid", "/run/docker.pid"];

/// dockerd.
pub struct Docker;

impl Runtime for Docker {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Docker
    }

    fn evidence(&self) -> &'static [&'static str] {
        &[
            "/etc/docker",
            "/var/run/docker.sock",
            "/run/docker.sock",
            "/usr/bin/dockerd",
            "/usr/local/bin/dockerd",
        ]
    }

    fn plan(
        &self,
        input: &PlanInput<'_>,
        pl: &mut Planner<'_>,
        exec: &mut dyn Executor,
    ) -> Result<Planned, AgentError> {
        let want = desired::docker(input.cfg)?;
        // Before anything is staged: a refusal here leaves every file of
        // the node as it was.
        let daemon_json_now = pl.read(DAEMON_JSON)?;
        refuse_keys_set_by_flags(
            pl.root(),
            &want.daemon_json,
            daemon_json_now.as_deref(),
            exec,
        )?;
        let mut planned = Planned {
            notes: want.notes.iter().map(|n| format!("docker: {n}")).collect(),
            ..Planned::default()
        };
        let before = pl.read(HOSTS)?;
        let current = before.as_deref().unwrap_or_default();
        let p = if input.opts.hosts_gate_closed {
            hosts::empty_block(current)
        } else {
            hosts::apply(current, &want.hosts)
        }
        .map_err(AgentError::patch(HOSTS))?;
        let after = if before.is_none() && p.bytes.is_empty() {
            None
        } else {
            Some(p.bytes)
        };
        pl.stage(HOSTS, before, after, FileKind::HostsBlock, p.notes);

        let before = pl.read(DAEMON_JSON)?;
        let prev = match pl.prev_kind(DAEMON_JSON) {
            Some(FileKind::DaemonJson { added }) => added.clone(),
            _ => Added::new(),
        };
        let p = daemon_json::apply(before.as_deref(), &want.daemon_json, &prev)
            .map_err(AgentError::patch(DAEMON_JSON))?;
        if p.bytes != before
            && let Some(bytes) = &p.bytes
            && let Some(Err(e)) = exec.validate_daemon_json(bytes)
        {
            return Err(AgentError::Rejected {
                path: DAEMON_JSON.into(),
                reason: e.0,
            });
        }
        planned.live_restore = daemon_json::live_restore(p.bytes.as_deref());
        planned.changed_keys = p.changed_keys.clone();
        pl.stage(
            DAEMON_JSON,
            before,
            p.bytes,
            FileKind::DaemonJson { added: p.added },
            Vec::new(),
        );

        if let Some(ca) = input.ca {
            for path in docker_certs::ca_paths(
                DOCKER_CERTS_D,
                want.ca_authorities.iter().map(String::as_str),
            ) {
                pl.stage_ca(&path, ca)?;
            }
        }
        Ok(planned)
    }

    fn after_apply(&self, cx: &AfterApply<'_>) -> Option<Step> {
        let dj = cx
            .changes
            .iter()
            .find(|c| c.path == DAEMON_JSON && c.changed());
        // Not configured any more: only undoing an earlier daemon.json
        // can concern dockerd.
        let keys = if cx.selected {
            cx.planned.changed_keys.clone()
        } else {
            dj.map(|c| removed_or_changed_keys(c.before.as_deref(), c.after.as_deref()))
                .unwrap_or_default()
        };
        if !cx.selected && keys.is_empty() {
            return None;
        }
        let other = cx
            .changes
            .iter()
            .filter(|c| c.changed())
            .any(|c| c.path == HOSTS || c.path.starts_with(DOCKER_CERTS_D));
        let d = decide_docker_action(&keys, other, cx.docker_action, cx.planned.live_restore);
        // A reload alone would leave a key the file no longer has (the
        // proxy's mirror, insecure-registries of plain-HTTP mode) in the
        // running daemon.
        let interim = match dj {
            Some(c) if d.action == Action::Reload => {
                interim_daemon_json(c.before.as_deref(), c.after.as_deref())
            }
            _ => None,
        };
        let reason = match &interim {
            Some((_, cleared)) => format!(
                "{}; {} emptied first: dockerd's reload skips keys that are gone",
                d.reason,
                cleared.join(", ")
            ),
            None => d.reason,
        };
        Some(Step {
            service: Service::Docker,
            action: d.action,
            dry_run_reason: Some(reason.clone()),
            reason,
            interim: interim.map(|(bytes, _)| Interim {
                path: DAEMON_JSON.into(),
                bytes,
                after: dj.and_then(|c| c.after.clone()),
            }),
        })
    }

    /// dockerd's reload applies only keys present in daemon.json: when
    /// revert removes `registry-mirrors` entirely, a plain SIGHUP would
    /// leave the proxy mirror in the running daemon. So dockerd is first
    /// reloaded through [`interim_daemon_json`], and after `reload_settle`
    /// the exact original is put back.
    fn before_revert(&self, cx: &mut BeforeRevert<'_, '_>) -> Result<bool, AgentError> {
        let Some(c) = cx
            .changes
            .iter_mut()
            .find(|c| c.path == DAEMON_JSON && c.changed())
        else {
            return Ok(false);
        };
        let Some((bytes, cleared)) = interim_daemon_json(c.before.as_deref(), c.after.as_deref())
        else {
            return Ok(false);
        };
        let step = Step {
            service: Service::Docker,
            action: Action::Reload,
            reason: format!(
                "clearing {} before daemon.json is restored",
                cleared.join(", ")
            ),
            dry_run_reason: None,
            interim: None,
        };
        match cx.actor.act_through(
            cx.root,
            &step,
            DAEMON_JSON,
            c.before.as_deref(),
            &bytes,
            cx.reload_settle,
        ) {
            Ok(_) => {}
            // Someone wrote it since revert read it: nothing written
            // here, and revert's own write leaves it to them too.
            Err(AgentError::ChangedDuringReload { .. }) => return Ok(false),
            Err(e) => return Err(e),
        }
        c.before = Some(bytes);
        Ok(true)
    }

    fn after_revert(&self, changes: &[Change]) -> Option<Step> {
        let c = changes
            .iter()
            .find(|c| c.path == DAEMON_JSON && c.changed())?;
        let keys = removed_or_changed_keys(c.before.as_deref(), c.after.as_deref());
        let reason = format!(
            "{} changed",
            keys.iter().cloned().collect::<Vec<_>>().join(", ")
        );
        Some(Step {
            service: Service::Docker,
            action: Action::Reload,
            dry_run_reason: Some(reason.clone()),
            reason,
            interim: None,
        })
    }
}

/// The running dockerd, as its pid file and `/proc` show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningDockerd {
    pub pid: i32,
    pub pid_file: &'static str,
    /// Its arguments after the program name.
    pub args: Vec<String>,
}

/// The dockerd a pid file under the root names, with its command line from
/// `/proc/<pid>/cmdline` under the root: the agent runs with `hostPID` and
/// the host's `/` (with its `/proc`) at the root, and `/proc` under a test
/// root is a plain directory the test writes. `None` when no pid file
/// names a live process whose program is `dockerd` (a stale pid file must
/// not stand for dockerd's flags).
pub fn running_dockerd(root: &Root) -> Result<Option<RunningDockerd>, AgentError> {
    for pid_file in PID_FILES {
        let Some(bytes) = root.read(pid_file)? else {
            continue;
        };
        let Ok(pid) = String::from_utf8_lossy(&bytes).trim().parse::<i32>() else {
            continue;
        };
        if pid <= 1 {
            continue;
        }
        let Some(cmdline) = root.read(&format!("/proc/{pid}/cmdline"))? else {
            continue;
        };
        let mut argv = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned());
        let program = argv.next().unwrap_or_default();
        if std::path::Path::new(&program)
            .file_name()
            .is_none_or(|n| n != "dockerd")
        {
            continue;
        }
        // cmdline ends with a NUL, which leaves one empty piece.
        let mut args: Vec<String> = argv.collect();
        if args.last().is_some_and(String::is_empty) {
            args.pop();
        }
        return Ok(Some(RunningDockerd {
            pid,
            pid_file,
            args,
        }));
    }
    Ok(None)
}

/// Whether dockerd's arguments set `flag` (`--flag value` or
/// `--flag=value`; pflag has no other long form), before a `--` that ends
/// the flags.
pub fn has_flag(args: &[String], flag: &str) -> bool {
    args.iter().take_while(|a| *a != "--").any(|a| {
        a.strip_prefix(flag)
            .is_some_and(|r| r.is_empty() || r.starts_with('='))
    })
}

/// Files dockerd's init scripts and units read its extra flags from
/// (`DOCKER_OPTS`, `OPTIONS`, …): Debian/Ubuntu, RHEL/SUSE, OpenRC.
pub const DOCKERD_ENV_FILES: [&str; 3] = [
    "/etc/default/docker",
    "/etc/sysconfig/docker",
    "/etc/conf.d/docker",
];

/// The words of each place a stopped dockerd's flags may come from, by
/// place; `Err` with why when they cannot be known.
pub type FlagSources = Result<Vec<(String, Vec<String>)>, String>;

/// Where a dockerd that is not running would take its flags from when it
/// starts: its systemd unit as `systemctl show` gives it (drop-ins
/// included: `ExecStart`, `Environment`, and the `EnvironmentFiles` it
/// reads), and [`DOCKERD_ENV_FILES`]. Every word of every variable set
/// there counts, used by the command line or not: a flag found where
/// dockerd does not look is a false alarm the error names, where missing
/// one would leave dockerd unable to start. Without systemd (an init
/// script) only the files are read.
pub fn dockerd_flags_at_rest(
    root: &Root,
    exec: &mut dyn Executor,
) -> Result<FlagSources, AgentError> {
    let mut sources = Vec::new();
    let mut files: Vec<String> = Vec::new();
    match exec.unit_start(Service::Docker) {
        None => {}
        Some(Err(e)) => return Ok(Err(e.to_string())),
        Some(Ok(show)) => {
            let unit = parse_unit_start(&show);
            sources.push(("docker.service's ExecStart".to_string(), unit.exec_start));
            sources.push(("docker.service's Environment".to_string(), unit.environment));
            files = unit.environment_files;
        }
    }
    for f in DOCKERD_ENV_FILES {
        if !files.iter().any(|g| g == f) {
            files.push(f.to_string());
        }
    }
    for f in files {
        match root.read(&f) {
            Ok(Some(bytes)) => sources.push((f, env_file_words(&bytes))),
            Ok(None) => {}
            Err(e) => return Ok(Err(e.to_string())),
        }
    }
    Ok(Ok(sources))
}

/// What `systemctl show docker -p ExecStart -p Environment -p
/// EnvironmentFiles` says, as words.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UnitStart {
    /// The words of every `argv[]` of `ExecStart` (`$VAR`s unexpanded).
    pub exec_start: Vec<String>,
    /// The words of the `Environment` assignments' values.
    pub environment: Vec<String>,
    pub environment_files: Vec<String>,
}

/// Parses `systemctl show` output: `ExecStart={ path=… ; argv[]=… ; … }`
/// (one `{…}` per command), `Environment=A=1 "B=x y"`,
/// `EnvironmentFiles=/etc/default/docker (ignore_errors=yes)` (a line
/// each).
pub fn parse_unit_start(show: &str) -> UnitStart {
    let mut u = UnitStart::default();
    for line in show.lines() {
        if let Some(v) = line.strip_prefix("ExecStart=") {
            for part in v.split("argv[]=").skip(1) {
                let argv = part.split(" ;").next().unwrap_or_default();
                u.exec_start
                    .extend(argv.split_whitespace().map(String::from));
            }
        } else if let Some(v) = line.strip_prefix("Environment=") {
            // An assignment's value may hold spaces (quoted, or escaped as
            // `\x20`): each word counts, without a `NAME=` before it.
            for word in unquoted_words(&v.replace("\\x20", " ")) {
                let value = match word.split_once('=') {
                    Some((name, value))
                        if !name.is_empty()
                            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
                    {
                        value.to_string()
                    }
                    _ => word,
                };
                if !value.is_empty() {
                    u.environment.push(value);
                }
            }
        } else if let Some(v) = line.strip_prefix("EnvironmentFiles=") {
            let path = v.split(" (").next().unwrap_or_default().trim();
            if path.starts_with('/') {
                u.environment_files.push(path.to_string());
            }
        }
    }
    u
}

/// The words of the values an environment file sets (`KEY=value`,
/// `export KEY="a b"`), comments skipped.
pub fn env_file_words(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut words = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        if let Some((_, value)) = line.split_once('=') {
            words.extend(unquoted_words(value));
        }
    }
    words
}

fn unquoted_words(value: &str) -> Vec<String> {
    value
        .split_whitespace()
        .map(|w| w.trim_matches(|c| c == '"' || c == '\''))
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect()
}

/// Refuses the apply when dockerd has the command-line flag for a
/// daemon.json key the agent would write. dockerd refuses a config file
/// setting a key its flags set (whatever the values), while `dockerd
/// --validate` runs without the unit's flags and passes: the SIGHUP would
/// fail in dockerd's log only and its next start would fail for good.
/// Leaving the key out instead is not safe either: without
/// `insecure-registries` the hijacked names would be dialled over TLS at a
/// plain-HTTP proxy, and a Docker Hub mirror silently not set would hide
/// the proxy being bypassed; so the admin is told what to change.
///
/// The flags are those of the running dockerd; of a stopped one, those
/// its unit and environment files would give it ([`dockerd_flags_at_rest`]).
/// When even those cannot be known (`systemctl show` failed), no key the
/// file lacks is added: one it has already is known not to conflict, or
/// dockerd could not have started with it.
fn refuse_keys_set_by_flags(
    root: &Root,
    want: &DaemonJsonWant,
    current: Option<&[u8]>,
    exec: &mut dyn Executor,
) -> Result<(), AgentError> {
    let sources: Vec<(String, Vec<String>)> = match running_dockerd(root)? {
        Some(d) => vec![(
            format!("dockerd (pid {} in {}) runs with", d.pid, d.pid_file),
            d.args,
        )],
        None => match dockerd_flags_at_rest(root, exec)? {
            Ok(sources) => sources
                .into_iter()
                .map(|(place, words)| {
                    (
                        format!("dockerd is not running, and {place} would start it with"),
                        words,
                    )
                })
                .collect(),
            Err(why) => {
                let has = current
                    .and_then(|b| daemon_json::parse(b).ok())
                    .unwrap_or_default();
                for (_, key) in DOCKERD_FLAGS {
                    let values = want.for_key(key);
                    if !values.is_empty() && !has.contains_key(key) {
                        return Err(AgentError::DockerdFlagsUnknown {
                            path: DAEMON_JSON.into(),
                            why,
                            key,
                            values: values.join(", "),
                        });
                    }
                }
                return Ok(());
            }
        },
    };
    for (flag, key) in DOCKERD_FLAGS {
        let values = want.for_key(key);
        if values.is_empty() {
            continue;
        }
        let Some((found, _)) = sources.iter().find(|(_, words)| has_flag(words, flag)) else {
            continue;
        };
        let remedy = if key == INSECURE_REGISTRIES {
            "Drop --insecure-registry from dockerd's unit and put its values in daemon.json's `insecure-registries` (the agent keeps them), then restart dockerd; or serve the proxy over TLS (proxy.caFile), which needs no insecure-registries"
        } else {
            "Drop --registry-mirror from dockerd's unit and put its mirrors in daemon.json's `registry-mirrors` (the agent keeps them, after the proxy), then restart dockerd; or set nodes.dnsHijack: false on docker.io, which needs no registry-mirrors"
        };
        return Err(AgentError::DockerdFlag {
            path: DAEMON_JSON.into(),
            found: format!("{found} {flag}"),
            key,
            values: values.join(", "),
            remedy,
        });
    }
    Ok(())
}

/// daemon.json as dockerd must read it on its way from `before` to
/// `after`, and the keys it empties; `None` when a reload of `after`
/// alone will do. dockerd's reload applies only keys present in the file,
/// so a managed list `before` has and `after` lacks would keep its old
/// values in the running daemon: the interim is `after` with each such
/// key set to `[]`.
pub fn interim_daemon_json(
    before: Option<&[u8]>,
    after: Option<&[u8]>,
) -> Option<(Vec<u8>, Vec<String>)> {
    let before = before.and_then(|b| daemon_json::parse(b).ok())?;
    let mut interim = match after {
        Some(a) => daemon_json::parse(a).ok()?,
        None => serde_json::Map::new(),
    };
    let cleared: Vec<String> = [REGISTRY_MIRRORS, INSECURE_REGISTRIES]
        .into_iter()
        .filter(|k| before.contains_key(*k) && !interim.contains_key(*k))
        .map(String::from)
        .collect();
    if cleared.is_empty() {
        return None;
    }
    for k in &cleared {
        interim.insert(k.clone(), serde_json::Value::Array(Vec::new()));
    }
    let mut bytes = serde_json::to_vec_pretty(&serde_json::Value::Object(interim)).ok()?;
    bytes.push(b'\n');
    Some((bytes, cleared))
}

/// daemon.json keys present in `before` and different (or gone) in
/// `after`.
fn removed_or_changed_keys(before: Option<&[u8]>, after: Option<&[u8]>) -> BTreeSet<String> {
    let b = before
        .and_then(|b| daemon_json::parse(b).ok())
        .unwrap_or_default();
    let a = after
        .and_then(|a| daemon_json::parse(a).ok())
        .unwrap_or_default();
    b.keys()
        .chain(a.keys())
        .filter(|k| b.get(*k) != a.get(*k))
        .cloned()
        .collect()
}

/// `--docker-action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DockerActionArg {
    /// What the change needs (a restart only with live-restore on).
    Auto,
    /// At most a reload (SIGHUP), whatever changed.
    Reload,
    /// Restart dockerd when daemon.json changed, even without live-restore.
    Restart,
    /// Never touch dockerd; print what it would need.
    None,
}

/// An action and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub reason: String,
}

/// daemon.json keys dockerd re-reads on SIGHUP.
pub const RELOADABLE_KEYS: &[&str] = &[
    REGISTRY_MIRRORS,
    INSECURE_REGISTRIES,
    "live-restore",
    "debug",
    "labels",
    "max-concurrent-downloads",
    "max-concurrent-uploads",
    "max-download-attempts",
    "shutdown-timeout",
    "default-runtime",
    "runtimes",
    "allow-nondistributable-artifacts",
];

/// What dockerd needs after a change: nothing for `/etc/hosts` and
/// certs.d (re-read on use), SIGHUP for reloadable daemon.json keys, a
/// restart for anything else, as `--docker-action` allows. Without
/// live-restore a restart would stop every container, so `auto` does not
/// restart then and says so.
pub fn decide_docker_action(
    changed_keys: &BTreeSet<String>,
    other_changes: bool,
    arg: DockerActionArg,
    live_restore: bool,
) -> Decision {
    let keys = changed_keys.iter().cloned().collect::<Vec<_>>().join(", ");
    let needed = if changed_keys.is_empty() {
        Action::Nothing
    } else if changed_keys
        .iter()
        .all(|k| RELOADABLE_KEYS.contains(&k.as_str()))
    {
        Action::Reload
    } else {
        Action::Restart
    };
    let d = |action, reason: String| Decision { action, reason };
    match (needed, arg) {
        (Action::Nothing, _) if other_changes => d(
            Action::Nothing,
            "only /etc/hosts and certs.d changed; dockerd re-reads them on use".into(),
        ),
        (Action::Nothing, _) => d(Action::Nothing, "no dockerd setting changed".into()),
        (_, DockerActionArg::None) => d(
            Action::Nothing,
            format!(
                "{keys} changed; --docker-action none: dockerd needs a {} to use it",
                if needed == Action::Reload {
                    "reload (SIGHUP)"
                } else {
                    "restart"
                }
            ),
        ),
        (_, DockerActionArg::Restart) => d(
            Action::Restart,
            format!("{keys} changed; restart requested (--docker-action restart)"),
        ),
        (Action::Restart, DockerActionArg::Reload) => d(
            Action::Reload,
            format!(
                "{keys} changed; --docker-action reload: settings outside SIGHUP's reach wait for the next restart"
            ),
        ),
        (Action::Reload, _) => d(Action::Reload, format!("{keys} changed (reloadable)")),
        (Action::Restart, _) if !live_restore => d(
            Action::Nothing,
            format!(
                "{keys} changed and need a restart, but live-restore is off: restarting dockerd would stop every container. Restart it yourself, or pass --docker-action restart"
            ),
        ),
        (Action::Restart, _) => d(
            Action::Restart,
            format!("{keys} changed (needs a restart; live-restore is on)"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(k: &[&str]) -> BTreeSet<String> {
        k.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn dockerd_flags_are_found_in_both_long_forms_and_only_before_a_double_dash() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let flag = "--insecure-registry";
        assert!(has_flag(
            &args(&["-H", "fd://", flag, "10.96.0.0/12"]),
            flag
        ));
        assert!(has_flag(&args(&["--insecure-registry=10.96.0.0/12"]), flag));
        assert!(!has_flag(&args(&["--insecure-registryx=1"]), flag));
        assert!(!has_flag(&args(&["--registry-mirror", "https://m"]), flag));
        assert!(!has_flag(&args(&["--", flag, "10.96.0.0/12"]), flag));
    }

    /// `systemctl show` as systemd 252 prints it for a unit with a
    /// drop-in that replaced ExecStart, an Environment= with a quoted
    /// value and two environment files.
    #[test]
    fn a_units_start_is_read_from_systemctl_show() {
        let show = "ExecStart={ path=/usr/bin/dockerd ; argv[]=/usr/bin/dockerd -H fd:// $DOCKER_OPTS ; ignore_errors=no ; start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }\n\
Environment=HTTP_PROXY=http://p:3128 \"EXTRA=--debug --insecure-registry 10.96.0.0/12\" OTHER=--registry-mirror\\x20https://m\n\
EnvironmentFiles=/etc/default/docker (ignore_errors=yes)\n\
EnvironmentFiles=/etc/docker/env (ignore_errors=no)\n";
        let u = parse_unit_start(show);
        assert_eq!(
            u.exec_start,
            ["/usr/bin/dockerd", "-H", "fd://", "$DOCKER_OPTS"]
        );
        assert!(has_flag(&u.environment, "--insecure-registry"), "{u:?}");
        assert!(has_flag(&u.environment, "--registry-mirror"), "{u:?}");
        assert!(
            !u.environment.iter().any(|w| w.starts_with("HTTP_PROXY")),
            "{u:?}"
        );
        assert_eq!(
            u.environment_files,
            ["/etc/default/docker", "/etc/docker/env"]
        );
        assert_eq!(
            parse_unit_start("ExecStart=\nEnvironment=\n"),
            UnitStart::default()
        );
    }

    #[test]
    fn environment_files_give_the_words_of_their_values() {
        let w = env_file_words(
            b"# DOCKER_OPTS=\"--registry-mirror=https://commented\"\n\nexport DOCKER_OPTS=\"--dns 8.8.8.8 --insecure-registry=10.0.0.0/8\"\nOPTIONS='--selinux-enabled'\n",
        );
        assert_eq!(
            w,
            [
                "--dns",
                "8.8.8.8",
                "--insecure-registry=10.0.0.0/8",
                "--selinux-enabled"
            ]
        );
        assert!(!has_flag(&w, "--registry-mirror"));
    }

    #[test]
    fn docker_action_table() {
        use Action::*;
        use DockerActionArg as A;
        let mirrors = keys(&[REGISTRY_MIRRORS]);
        let other = keys(&["storage-driver"]);
        let none = keys(&[]);
        for (changed, others, arg, live, want) in [
            (&none, true, A::Auto, false, Nothing),
            (&none, false, A::Restart, true, Nothing),
            (&mirrors, false, A::Auto, false, Reload),
            (&mirrors, false, A::Reload, false, Reload),
            (&mirrors, false, A::Restart, false, Restart),
            (&mirrors, false, A::None, true, Nothing),
            (&other, false, A::Auto, false, Nothing),
            (&other, false, A::Auto, true, Restart),
            (&other, false, A::Reload, false, Reload),
            (&other, false, A::Restart, false, Restart),
        ] {
            let d = decide_docker_action(changed, others, arg, live);
            assert_eq!(
                d.action, want,
                "{changed:?} {arg:?} live={live}: {}",
                d.reason
            );
        }
        let d = decide_docker_action(&other, false, A::Auto, false);
        assert!(d.reason.contains("live-restore is off"), "{}", d.reason);
        let d = decide_docker_action(&none, true, A::Auto, false);
        assert!(d.reason.contains("re-reads"), "{}", d.reason);
    }
}
