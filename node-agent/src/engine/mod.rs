//! `apply`, `revert` and `status` over the runtimes: every runtime stages
//! its files into one plan (all patchers run and validate before anything
//! is written), then the plan is backed up, recorded and written, and
//! finally each runtime says what its daemon needs.

pub mod plan;
mod status;

use std::io::Write;
use std::time::{Duration, SystemTime};

use crate::config::AgentConfig;
use crate::error::{AgentError, ConfigError};
use crate::fsio::Root;
use crate::patch::docker_certs;
use crate::runtime::{
    self, Action, AfterApply, BeforeRevert, Executor, PlanInput, Planned, RuntimeKind, Step,
};
use crate::state::{self, LastApply};
use plan::{
    Planner, commit, prune_dirs, revert_file, write_diff, write_files_checked, writeln_out,
};

pub use crate::runtime::docker::{DAEMON_JSON, HOSTS};
pub use crate::runtime::{Actor, ApplyOptions};
pub use status::{FileStatus, Status, status, status_table};

/// Options of `revert`.
#[derive(Debug, Clone)]
pub struct RevertOptions {
    pub dry_run: bool,
    /// How long dockerd gets to re-read an intermediate daemon.json (see
    /// `Runtime::before_revert` of dockerd).
    pub reload_settle: Duration,
}

/// What a command did, for tests and callers.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// `(verb, path)` of each file changed (or to change, in a dry run).
    pub files: Vec<(String, String)>,
    /// Runtime actions taken (or planned), one line each.
    pub actions: Vec<String>,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Applies the config once: plans, prints, writes, tells runtimes.
///
/// With the health gate closed, a failure anywhere (another runtime's
/// refused file, a daemon.json dockerd rejects) still empties the
/// `/etc/hosts` block: hijacked names must not keep pointing at a proxy
/// that is down because of something unrelated. The failure is still
/// the apply's error.
pub fn apply(
    root: &Root,
    cfg: &AgentConfig,
    opts: &ApplyOptions,
    exec: &mut dyn Executor,
    out: &mut dyn Write,
) -> Result<Report, AgentError> {
    let res = apply_all(root, cfg, opts, exec, out);
    if res.is_err() && opts.hosts_gate_closed && !opts.dry_run {
        match close_hosts_gate(root, out) {
            Ok(true) => writeln_out(
                out,
                &format!("{HOSTS}: health gate closed: block emptied although the apply failed"),
            ),
            Ok(false) => {}
            Err(e) => writeln_out(
                out,
                &format!("{HOSTS}: health gate closed, but the block could not be emptied: {e}"),
            ),
        }
    }
    res
}

/// Empties the agent's `/etc/hosts` block on its own, leaving every other
/// file and record as it is; `true` when the file changed.
fn close_hosts_gate(root: &Root, out: &mut dyn Write) -> Result<bool, AgentError> {
    let Some(mut st) = state::load(root)? else {
        return Ok(false);
    };
    if !matches!(
        st.files.get(HOSTS).map(|r| &r.kind),
        Some(state::FileKind::HostsBlock)
    ) {
        return Ok(false);
    }
    let Some(before) = root.read(HOSTS)? else {
        return Ok(false);
    };
    let p = crate::patch::hosts::empty_block(&before).map_err(AgentError::patch(HOSTS))?;
    if p.bytes == before {
        return Ok(false);
    }
    let mut pl = Planner::new(root, &st);
    pl.stage(
        HOSTS,
        Some(before),
        Some(p.bytes),
        state::FileKind::HostsBlock,
        p.notes,
    );
    let changes = pl.staged();
    commit(root, &mut st, changes, out)?;
    Ok(true)
}

fn apply_all(
    root: &Root,
    cfg: &AgentConfig,
    opts: &ApplyOptions,
    exec: &mut dyn Executor,
    out: &mut dyn Write,
) -> Result<Report, AgentError> {
    let mut st = state::load(root)?.unwrap_or_default();
    let mut notes = Vec::new();
    let selected = runtime::select(root, opts.runtimes.as_deref(), &mut notes)?;
    let ca = match &cfg.ca_pem {
        Some(pem) => Some(docker_certs::ca_file(pem).map_err(ConfigError::CaFile)?),
        None => None,
    };
    let input = PlanInput {
        cfg,
        opts,
        ca: ca.as_deref(),
    };
    let mut pl = Planner::new(root, &st);
    let mut planned: Vec<(RuntimeKind, Planned)> = Vec::new();
    for kind in RuntimeKind::ALL
        .into_iter()
        .filter(|k| selected.contains(k))
    {
        let mut p = kind.runtime().plan(&input, &mut pl, exec)?;
        notes.append(&mut p.notes);
        planned.push((kind, p));
    }
    let changes = pl.finish()?;
    for (path, kind) in newer_files(&st) {
        notes.push(format!(
            "{path}: left alone: managed by a newer agent (record kind `{kind}`)"
        ));
    }

    for n in &notes {
        writeln_out(out, n);
    }
    let mut report = Report::default();
    for c in changes.iter().filter(|c| c.changed()) {
        report.files.push((c.verb().to_string(), c.path.clone()));
    }
    let not_planned = Planned::default();
    let steps: Vec<Step> = RuntimeKind::ALL
        .into_iter()
        .filter_map(|kind| {
            let planned = planned
                .iter()
                .find(|(k, _)| *k == kind)
                .map_or(&not_planned, |(_, p)| p);
            kind.runtime().after_apply(&AfterApply {
                selected: selected.contains(&kind),
                planned,
                changes: &changes,
                docker_action: opts.docker_action,
            })
        })
        .collect();
    // Daemon actions an earlier apply wrote files for but could not carry
    // out are owed until they succeed, whether or not a file changes now;
    // but this apply's `--docker-action` decides what dockerd gets, and a
    // restart an earlier agent began without seeing its end is not begun
    // again: it may be what stopped that agent (`systemctl restart docker`
    // stops the agent's own pod on a cri-dockerd node), and repeating it
    // would stop this one too, for ever.
    let mut owed: Vec<Step> = Vec::new();
    let mut not_done: Vec<String> = Vec::new();
    // Owed actions this agent cannot read (a newer one's) stay owed for it.
    let mut unknown_owed = Vec::new();
    for p in &st.pending_actions {
        let Some(s) = Step::from_pending(p) else {
            unknown_owed.push(p.clone());
            continue;
        };
        let who = s.service.process();
        if p.started {
            not_done.push(format!(
                "{who}: owed {} ({}) not repeated: an earlier agent began it and did not see it end (the restart may have stopped that agent)",
                s.action.word(),
                p.reason
            ));
            continue;
        }
        match s.owed_under(opts.docker_action) {
            Ok(s) => {
                writeln_out(
                    out,
                    &format!(
                        "{who}: {} still owed (it failed at an earlier apply)",
                        s.action.word()
                    ),
                );
                owed.push(s);
            }
            Err(line) => not_done.push(line),
        }
    }
    for line in &not_done {
        writeln_out(out, line);
    }
    let retrying = !owed.is_empty();
    let steps = merge_steps(owed, steps);

    if opts.dry_run {
        for c in changes.iter().filter(|c| c.changed()) {
            write_diff(out, c);
        }
        if report.files.is_empty() && !retrying {
            writeln_out(out, "no changes");
            return Ok(report);
        }
        let mut actor = Actor::new(exec, out);
        for step in &steps {
            actor.dry_run(step);
        }
        report.actions = actor.actions;
        writeln_out(out, "dry run: nothing was written");
        return Ok(report);
    }

    if report.files.is_empty() && !retrying {
        if !not_done.is_empty() {
            // Not owed any more.
            st.pending_actions = unknown_owed;
            state::save(root, &mut st)?;
            report.actions = not_done;
        }
        writeln_out(out, "no changes");
        return Ok(report);
    }
    // Owed from before the files are written: a failed (or interrupted)
    // action is then retried by the next apply.
    st.pending_actions = steps.iter().filter_map(Step::to_pending).collect();
    st.pending_actions.extend(unknown_owed.iter().cloned());
    if report.files.is_empty() {
        writeln_out(out, "no file changes");
    } else {
        commit(root, &mut st, changes, out)?;
    }

    let mut actor = Actor::new(exec, out);
    let mut still_owed = Vec::new();
    let mut changed_meanwhile = Vec::new();
    for step in &steps {
        if step.action == Action::Restart {
            // Recorded as begun before it begins (see `owed` above).
            for p in st
                .pending_actions
                .iter_mut()
                .filter(|p| p.service == step.service.unit())
            {
                p.started = true;
            }
            state::save(root, &mut st)?;
        }
        let failed_before = actor.failed.len();
        match actor.act_after_apply(root, step, opts.reload_settle) {
            Ok(_) => {}
            // The other daemons still hear about their files; this one's
            // reload stays owed, and the apply fails saying why.
            Err(e @ AgentError::ChangedDuringReload { .. }) => {
                writeln_out(actor.out, &format!("{}: {e}", step.service.process()));
                still_owed.extend(step.to_pending());
                changed_meanwhile.push(e);
                continue;
            }
            Err(e) => return Err(e),
        }
        if actor.failed.len() > failed_before {
            still_owed.extend(step.to_pending());
        }
    }
    st.pending_actions = still_owed;
    st.pending_actions.extend(unknown_owed);
    report.actions = not_done;
    report.actions.append(&mut actor.actions);
    st.last_apply = Some(LastApply {
        config_sha256: cfg.sha256.clone(),
        proxy: cfg.proxy.base_url(),
        runtimes: selected.iter().map(|r| r.name().to_string()).collect(),
        at_unix: now_unix(),
        actions: report.actions.clone(),
        extra: Default::default(),
    });
    state::save(root, &mut st)?;
    if !actor.failed.is_empty() {
        return Err(AgentError::Actions {
            done: "written",
            failed: actor.failed,
        });
    }
    if let Some(e) = changed_meanwhile.pop() {
        return Err(e);
    }
    Ok(report)
}

/// This apply's steps plus those owed from earlier ones: one step per
/// daemon, the stronger action winning (a restart covers a reload), in
/// the order the runtimes are walked.
fn merge_steps(owed: Vec<Step>, mut steps: Vec<Step>) -> Vec<Step> {
    for o in owed {
        match steps.iter_mut().find(|s| s.service == o.service) {
            Some(s) if s.action >= o.action => {}
            Some(s) => *s = o,
            None => steps.push(o),
        }
    }
    steps.sort_by_key(|s| s.service);
    steps
}

/// The files a newer agent recorded with a kind this one does not know,
/// with that kind.
fn newer_files(st: &state::State) -> impl Iterator<Item = (&str, &str)> {
    st.newer_files.iter().map(|(path, rec)| {
        (
            path.as_str(),
            state::FileKind::unknown_type(rec).unwrap_or("?"),
        )
    })
}

/// Removes everything the agent ever added and restores first-edit
/// backups, then the state itself; each runtime's daemon is told before
/// (dockerd's interim daemon.json) or after the files are back.
pub fn revert(
    root: &Root,
    opts: &RevertOptions,
    exec: &mut dyn Executor,
    out: &mut dyn Write,
) -> Result<Report, AgentError> {
    let Some(mut st) = state::load(root)? else {
        writeln_out(
            out,
            "nothing to revert: the agent has not applied anything here",
        );
        return Ok(Report::default());
    };
    // A file that cannot be reverted (an admin broke its syntax) must not
    // keep the others pointing at the proxy: revert the rest, and keep the
    // record and backup of the failed ones for a revert after the fix.
    let mut changes = Vec::new();
    // A newer agent's files are its own to revert: left alone, with their
    // record and backup, and named in the error.
    let mut unreverted: Vec<AgentError> = newer_files(&st)
        .map(|(path, kind)| AgentError::NewerAgentFile {
            path: path.to_string(),
            kind: kind.to_string(),
        })
        .collect();
    for (path, rec) in &st.files {
        match revert_file(root, path, rec) {
            Ok(c) => changes.push(c),
            Err(e) => unreverted.push(e),
        }
    }
    let mut report = Report::default();
    for c in changes.iter().filter(|c| c.changed()) {
        report.files.push((c.verb().to_string(), c.path.clone()));
    }
    if opts.dry_run {
        for c in changes.iter().filter(|c| c.changed()) {
            write_diff(out, c);
        }
        let mut actor = Actor::new(exec, out);
        for kind in RuntimeKind::ALL {
            if let Some(step) = kind.runtime().after_revert(&changes) {
                actor.dry_run(&step);
            }
        }
        report.actions = actor.actions;
        writeln_out(out, "dry run: nothing was written");
        if !unreverted.is_empty() {
            return Err(AgentError::RevertIncomplete { failed: unreverted });
        }
        return Ok(report);
    }

    let mut actor = Actor::new(exec, &mut *out);
    let mut done = Vec::new();
    for kind in RuntimeKind::ALL {
        let mut cx = BeforeRevert {
            root,
            changes: &mut changes,
            actor: &mut actor,
            reload_settle: opts.reload_settle,
        };
        if kind.runtime().before_revert(&mut cx)? {
            done.push(kind);
        }
    }
    let (mut actions, mut failed) = (actor.actions, actor.failed);

    // A file written by someone else since it was read keeps their
    // content, its record and its backup, like a file revert could not
    // undo: a second revert finishes the job.
    let left = write_files_checked(root, &changes, out)?;
    changes.retain(|c| !left.contains(&c.path));
    report.files.retain(|(_, p)| !left.contains(p));
    unreverted.extend(
        left.into_iter()
            .map(|path| AgentError::ChangedDuringRevert { path }),
    );
    for c in &changes {
        st.files.remove(&c.path);
    }
    prune_dirs(root, &mut st)?;
    if unreverted.is_empty() {
        for d in &st.created_dirs {
            writeln_out(out, &format!("kept      {d}/ (not empty)"));
        }
        state::remove_all(root, &st)?;
    } else {
        for c in &changes {
            state::remove_backup(root, &c.path)?;
        }
        // Owed for the configuration being removed, not for what is left.
        st.pending_actions.clear();
        state::save(root, &mut st)?;
    }

    let mut actor = Actor::new(exec, out);
    for kind in RuntimeKind::ALL.into_iter().filter(|k| !done.contains(k)) {
        if let Some(step) = kind.runtime().after_revert(&changes) {
            actor.act(&step);
        }
    }
    actions.append(&mut actor.actions);
    failed.append(&mut actor.failed);
    report.actions = actions;
    if report.files.is_empty() {
        writeln_out(out, "no changes (the agent's files were already gone)");
    }
    if !unreverted.is_empty() {
        if !failed.is_empty() {
            unreverted.push(AgentError::Actions {
                done: "restored",
                failed,
            });
        }
        return Err(AgentError::RevertIncomplete { failed: unreverted });
    }
    if !failed.is_empty() {
        return Err(AgentError::Actions {
            done: "restored",
            failed,
        });
    }
    Ok(report)
}

#[cfg(test)]
mod tests;
