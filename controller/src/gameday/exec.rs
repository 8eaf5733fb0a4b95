//! One game-day run: the experiments in order, within the maximum duration, under
//! a lock that no other controller can hold at the same time, recorded before and
//! after, then notified.
//!
//! Two locks keep a game day from running twice at once:
//! - `STATE/locks/NAME.lock` (flock) for controllers sharing a state directory;
//! - `gameday:NAME` on every agent the game day touches (a session lock that lapses
//!   with its lease), for controllers on different machines.

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuchaos_proto::pb;
use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use super::clock::WallClock;
use super::file::{GameDay, OnFailure};
use super::history::{
    self, ExperimentOutcome, GamedayRun, GamedayVerdict, HistoryError, ObjectiveOutcome, Store,
};
use super::notify;
use crate::exit;
use crate::experiment::load;
use crate::fleet::{AgentRef, Fleet};
use crate::runner::agents::{self, Renewal};
use crate::runner::{self, RunOptions};

/// Lease of the game-day lock sessions; renewed every third of it.
const LOCK_LEASE: Duration = Duration::from_secs(15);

/// What became of a run's latest state.
#[derive(Debug, Clone, Copy)]
pub enum Saved<'a> {
    Ok,
    Failed(&'a HistoryError),
    /// Progress only (an experiment started): nothing was written.
    NotYet,
}

/// Called with each state of a run.
pub type OnUpdate = Box<dyn Fn(&GamedayRun, Saved<'_>) + Send + Sync>;

/// What every run needs from `serve`.
pub struct Ctx {
    pub store: Arc<Mutex<Store>>,
    /// `STATE/runs` and `STATE/locks` (known without taking the store's lock).
    pub runs_dir: PathBuf,
    pub locks_dir: PathBuf,
    pub cli_fleet: Fleet,
    pub clock: Arc<dyn WallClock>,
    pub public_url: Option<String>,
    /// `HOST pid N`.
    pub controller: String,
    /// Called with each saved state of a run (for the page and the metrics).
    pub on_update: OnUpdate,
}

/// Why a run did not happen at all (nothing recorded under its id).
#[derive(Debug)]
pub enum NotStarted {
    /// Another controller sharing this state directory holds the game day's lock.
    LockedLocally(String),
    /// This slot already has a run folder (it ran before a restart).
    AlreadyRecorded(String),
    /// The run could not be recorded, so it was not started.
    CannotRecord(String),
}

/// `NAME-YYYYMMDDTHHMMSSZ`.
pub fn run_id(gameday: &str, at: Timestamp) -> String {
    format!(
        "{gameday}-{}",
        at.to_zoned(jiff::tz::TimeZone::UTC)
            .strftime("%Y%m%dT%H%M%SZ")
    )
}

/// Records a slot that did not run (missed or skipped). None when the slot already
/// has an entry (another controller sharing the state directory ran it).
pub async fn record_slot(
    ctx: &Ctx,
    gd: &GameDay,
    slot: Timestamp,
    missed_slots: u32,
    verdict: GamedayVerdict,
    reason: String,
) -> Option<GamedayRun> {
    let id = run_id(&gd.name, slot);
    if let Err(m) = claim(&ctx.runs_dir.join(&id)) {
        tracing::info!(gameday = %gd.name, "slot not recorded as {verdict}: {m}");
        return None;
    }
    let now = ctx.clock.now().as_millisecond();
    let mut run = GamedayRun {
        format: history::FORMAT,
        id,
        gameday: gd.name.clone(),
        file: gd.file.display().to_string(),
        trigger: "schedule".into(),
        slot_unix_ms: Some(slot.as_millisecond()),
        missed_slots,
        revision: 0,
        started_unix_ms: now,
        ended_unix_ms: Some(now),
        verdict: verdict.clone(),
        exit_code: None,
        reason: Some(reason),
        controller: ctx.controller.clone(),
        experiments: Vec::new(),
        notifications: Vec::new(),
    };
    tracing::warn!(gameday = %gd.name, slot = %slot, "{verdict}: {}", run.reason.as_deref().unwrap_or(""));
    save(ctx, &mut run).await;
    Some(run)
}

/// Sends the run's notifications and records their outcome.
pub async fn notify(ctx: &Ctx, gd: &GameDay, run: &mut GamedayRun) {
    run.notifications = notify::notify_all(gd, run, ctx.public_url.as_deref()).await;
    if !run.notifications.is_empty() {
        save(ctx, run).await;
    }
}

/// Saves off the runtime's threads (a locked database waits up to 5 s). The error is
/// logged and passed on; the summary is on disk either way, or the error says not.
async fn save(ctx: &Ctx, run: &mut GamedayRun) -> Option<HistoryError> {
    run.revision += 1;
    let store = ctx.store.clone();
    let r = run.clone();
    let res = tokio::task::spawn_blocking(move || store.lock().unwrap().save(&r))
        .await
        .unwrap_or_else(|e| {
            Err(HistoryError {
                kind: history::HistoryErrorKind::Io,
                message: format!("saving panicked: {e}"),
            })
        });
    let err = res.err();
    if let Some(e) = &err {
        tracing::error!(run = %run.id, "history: {e}");
    }
    (ctx.on_update)(run, err.as_ref().map_or(Saved::Ok, Saved::Failed));
    err
}

/// Runs the game day once. `stop` ends it early (serve is stopping): the current
/// experiment is interrupted, which reverts its faults.
pub async fn execute(
    ctx: &Ctx,
    gd: &GameDay,
    slot: Option<Timestamp>,
    trigger: &str,
    stop: CancellationToken,
) -> Result<GamedayRun, NotStarted> {
    let started = ctx.clock.now();
    let id = run_id(&gd.name, slot.unwrap_or(started));
    let run_dir = ctx.runs_dir.join(&id);
    let _flock = lock_locally(&ctx.locks_dir, &gd.name)?;
    claim(&run_dir).map_err(NotStarted::AlreadyRecorded)?;
    let mut run = GamedayRun {
        format: history::FORMAT,
        id: id.clone(),
        gameday: gd.name.clone(),
        file: gd.file.display().to_string(),
        trigger: trigger.into(),
        slot_unix_ms: slot.map(|s| s.as_millisecond()),
        missed_slots: 0,
        revision: 0,
        started_unix_ms: started.as_millisecond(),
        ended_unix_ms: None,
        verdict: GamedayVerdict::Running,
        exit_code: None,
        reason: None,
        controller: ctx.controller.clone(),
        experiments: Vec::new(),
        notifications: Vec::new(),
    };
    if let Some(e) = save(ctx, &mut run).await
        && e.kind == history::HistoryErrorKind::Io
        && !run_dir.join("run.json").exists()
    {
        return Err(NotStarted::CannotRecord(e.message));
    }
    tracing::info!(gameday = %gd.name, run = %id, trigger, "game day starting");

    // Load every experiment first: the lock covers all their agents.
    let mut loaded = Vec::new();
    for (i, path) in gd.experiments.iter().enumerate() {
        loaded.push((i, path, load::load_file(path)));
    }
    let mut lock_targets: BTreeMap<String, (Fleet, AgentRef)> = BTreeMap::new();
    for (_, _, l) in &loaded {
        if let Ok(l) = l {
            let fleet = runner::fleet_for(l, &ctx.cli_fleet);
            for a in &fleet.agents {
                lock_targets
                    .entry(a.address.clone())
                    .or_insert_with(|| (fleet.clone(), a.clone()));
            }
        }
    }
    let holder = format!(
        "gpuchaos serve: game day {} run {id} ({})",
        gd.name, ctx.controller
    );
    let lock_name = format!("gameday:{}", gd.name);
    let (sessions, refused) = open_lock_sessions(&lock_targets, &holder, &lock_name).await;
    if let Some(why) = refused {
        close_lock_sessions(sessions).await;
        run.verdict = GamedayVerdict::Skipped;
        run.reason = Some(format!(
            "game day {} is already running from another controller: {why}",
            gd.name
        ));
        return Ok(finish(ctx, gd, run).await);
    }
    // The run's interrupt: serve stopping, the maximum duration reached, or the
    // game-day lock lost on an agent.
    let interrupt = CancellationToken::new();
    let reason = Arc::new(Mutex::new(String::new()));
    let renew_stop = CancellationToken::new();
    let renewer = spawn_renewals(
        &sessions,
        renew_stop.clone(),
        interrupt.clone(),
        reason.clone(),
    );
    let watchdog = {
        let interrupt = interrupt.clone();
        let reason = reason.clone();
        let stop = stop.clone();
        let max = gd.max_duration;
        tokio::spawn(async move {
            let why = tokio::select! {
                _ = stop.cancelled() => "gpuchaos serve is stopping".to_string(),
                _ = tokio::time::sleep(max) => format!(
                    "the game day ran past its max_duration of {}", humantime::format_duration(max)
                ),
            };
            let mut r = reason.lock().unwrap();
            if r.is_empty() {
                *r = why;
            }
            drop(r);
            interrupt.cancel();
        })
    };

    let mut stop_reason: Option<String> = None;
    for (i, path, l) in loaded {
        let seq = i as u32 + 1;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("experiment{seq}"));
        let mut out = ExperimentOutcome {
            seq,
            name: stem.clone(),
            file: path.display().to_string(),
            ..Default::default()
        };
        if let Some(why) = &stop_reason {
            out.verdict = GamedayVerdict::NotRun;
            out.reason = Some(why.clone());
            run.experiments.push(out);
            continue;
        }
        let t0 = std::time::Instant::now();
        match l {
            Err(errs) => {
                out.verdict = GamedayVerdict::Error;
                out.exit_code = Some(exit::INVALID_INPUT);
                out.reason = Some(format!(
                    "the experiment no longer loads: {}",
                    errs.iter()
                        .map(|e| e.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                ));
            }
            Ok(l) => {
                out.name = l.experiment.metadata.name.clone();
                let rel = format!("{seq:02}-{}", sanitize(&out.name));
                let opts = RunOptions {
                    file: path.display().to_string(),
                    report_dir: Some(run_dir.join(&rel)),
                    cli_fleet: ctx.cli_fleet.clone(),
                    interrupt: interrupt.child_token(),
                    interrupt_reason: reason.clone(),
                    run_seed: None,
                };
                run.experiments.push(ExperimentOutcome {
                    verdict: GamedayVerdict::Running,
                    ..out.clone()
                });
                (ctx.on_update)(&run, Saved::NotYet);
                run.experiments.pop();
                match runner::run(&l, &opts).await {
                    Ok((record, code)) => {
                        out.verdict = record.verdict.into();
                        out.exit_code = Some(code);
                        out.reason = record.reason.clone();
                        out.report_dir = Some(rel);
                        // Objectives the run never got to evaluate have no value
                        // for the trends.
                        out.objectives = record
                            .objectives
                            .iter()
                            .filter(|o| o.evaluated)
                            .map(|o| ObjectiveOutcome {
                                name: o.name.clone(),
                                kind: o.kind.to_string(),
                                unit: o.unit.clone(),
                                measured: o.median,
                                limit: o.limit_text.clone(),
                                passed: o.passed,
                            })
                            .collect();
                    }
                    Err(e) => {
                        out.verdict = GamedayVerdict::Error;
                        out.exit_code = Some(e.code);
                        out.reason = Some(e.message);
                    }
                }
            }
        }
        out.duration_ms = t0.elapsed().as_millis() as u64;
        if interrupt.is_cancelled() {
            stop_reason = Some(reason.lock().unwrap().clone());
        } else if matches!(
            out.verdict,
            GamedayVerdict::Aborted | GamedayVerdict::RevertFailed
        ) {
            stop_reason = Some(format!(
                "not run: experiment {} ended {} (the game day stops after an abort or a failed revert)",
                out.name, out.verdict
            ));
        } else if gd.on_failure == OnFailure::Stop && out.verdict != GamedayVerdict::Passed {
            stop_reason = Some(format!(
                "not run: experiment {} did not pass and on_failure is stop",
                out.name
            ));
        }
        run.experiments.push(out);
        save(ctx, &mut run).await;
    }
    watchdog.abort();
    renew_stop.cancel();
    let _ = renewer.await;
    close_lock_sessions(sessions).await;

    let (verdict, code) = overall(&run.experiments);
    run.verdict = verdict;
    run.exit_code = Some(code);
    if interrupt.is_cancelled() {
        if run.verdict != GamedayVerdict::RevertFailed {
            run.verdict = GamedayVerdict::Aborted;
        }
        run.exit_code = Some(code.max(exit::ABORTED));
        run.reason = Some(reason.lock().unwrap().clone());
    } else if run.verdict != GamedayVerdict::Passed {
        let first = run
            .experiments
            .iter()
            .find(|e| !matches!(e.verdict, GamedayVerdict::Passed | GamedayVerdict::NotRun));
        run.reason = first.map(|e| {
            format!(
                "{}: {}{}",
                e.name,
                e.verdict,
                e.reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            )
        });
    }
    Ok(finish(ctx, gd, run).await)
}

async fn finish(ctx: &Ctx, gd: &GameDay, mut run: GamedayRun) -> GamedayRun {
    run.ended_unix_ms = Some(ctx.clock.now().as_millisecond());
    save(ctx, &mut run).await;
    tracing::info!(gameday = %gd.name, run = %run.id, verdict = %run.verdict, "game day ended");
    notify(ctx, gd, &mut run).await;
    run
}

/// The game day's verdict and exit code: the most serious of its experiments'.
pub fn overall(exps: &[ExperimentOutcome]) -> (GamedayVerdict, u8) {
    fn rank(verdict: &GamedayVerdict) -> u8 {
        use GamedayVerdict as V;
        match verdict {
            V::Passed | V::NotRun => 0,
            V::Failed => 1,
            V::InjectFailed => 2,
            V::Aborted => 3,
            V::Error => 4,
            // revert-failed: something may be left behind (and anything an
            // experiment should never end as is taken as seriously).
            V::RevertFailed
            | V::Running
            | V::Interrupted
            | V::Missed
            | V::Skipped
            | V::Other(_) => 5,
        }
    }
    let worst = exps
        .iter()
        .filter(|e| e.verdict != GamedayVerdict::NotRun)
        .max_by_key(|e| rank(&e.verdict));
    match worst {
        Some(e) if rank(&e.verdict) > 0 => {
            (e.verdict.clone(), e.exit_code.unwrap_or(exit::INTERNAL))
        }
        Some(_) => (GamedayVerdict::Passed, exit::OK),
        None => (GamedayVerdict::Error, exit::INTERNAL),
    }
}

/// Creates the run's folder: whoever creates it owns the id (controllers sharing a
/// state directory never write over each other's entry for a slot).
fn claim(dir: &Path) -> Result<(), String> {
    match std::fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(format!("{} is already recorded", dir.display()))
        }
        Err(e) => Err(format!("cannot create {}: {e}", dir.display())),
    }
}

/// Folder-safe experiment name.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

pub fn lock_locally(dir: &Path, name: &str) -> Result<nix::fcntl::Flock<File>, NotStarted> {
    let path: PathBuf = dir.join(format!("{name}.lock"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .read(true)
        .open(&path)
        .map_err(|e| NotStarted::CannotRecord(format!("cannot open {}: {e}", path.display())))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(mut l) => {
            use std::io::{Seek, Write};
            let _ = l.set_len(0);
            let _ = l.seek(std::io::SeekFrom::Start(0));
            let _ = writeln!(l, "pid {}", std::process::id());
            Ok(l)
        }
        Err((_, e)) => {
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            Err(NotStarted::LockedLocally(format!(
                "another gpuchaos on this machine is running game day {name} ({}; lock file {}): {e}",
                holder.trim(),
                path.display()
            )))
        }
    }
}

type LockSession = agents::Session;

/// Opens a lock session on each agent. Returns the sessions and, when an agent says
/// another controller holds the lock, why. An unreachable agent is logged and left
/// out: the experiment that needs it will fail on its own, with its own error.
async fn open_lock_sessions(
    targets: &BTreeMap<String, (Fleet, AgentRef)>,
    holder: &str,
    lock: &str,
) -> (Vec<LockSession>, Option<String>) {
    let mut sessions = Vec::new();
    for (fleet, agent) in targets.values() {
        let mut client = match fleet.client(agent) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(agent = %agent.display(), "no game-day lock on this agent: {}", e.message);
                continue;
            }
        };
        let r = client
            .open_session(pb::OpenSessionRequest {
                lease_ttl_ms: LOCK_LEASE.as_millis() as u64,
                holder: holder.to_string(),
                lock: lock.to_string(),
            })
            .await;
        match r {
            Ok(s) => sessions.push((agent.clone(), client, s.into_inner().id)),
            Err(s) if s.code() == tonic::Code::Aborted => {
                return (
                    sessions,
                    Some(format!("agent {} says: {}", agent.display(), s.message())),
                );
            }
            Err(s) => {
                tracing::warn!(agent = %agent.display(), "no game-day lock on this agent: {}", s.message());
            }
        }
    }
    (sessions, None)
}

/// Renews every lock session a third of the lease apart, all agents at once. A lock
/// an agent no longer knows (the lease lapsed: another controller may hold it now)
/// interrupts the run.
fn spawn_renewals(
    sessions: &[LockSession],
    stop: CancellationToken,
    interrupt: CancellationToken,
    reason: Arc<Mutex<String>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(agents::keep_renewed(
        sessions.to_vec(),
        LOCK_LEASE / 3,
        stop,
        move |agent, r| match r {
            Renewal::Lapsed(_) => {
                let why = format!(
                    "the game-day lock on agent {} lapsed (another controller could now run this game day)",
                    agent.display()
                );
                tracing::error!("{why}");
                let mut r = reason.lock().unwrap();
                if r.is_empty() {
                    *r = why;
                }
                drop(r);
                interrupt.cancel();
                ControlFlow::Break(())
            }
            _ => {
                tracing::warn!(
                    agent = %agent.display(),
                    "could not renew the game-day lock; it lapses if this lasts"
                );
                ControlFlow::Continue(())
            }
        },
    ))
}

async fn close_lock_sessions(sessions: Vec<LockSession>) {
    for (_, mut client, id) in sessions {
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            client.close_session(pb::CloseSessionRequest {
                session_id: id,
                keep_faults: false,
            }),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(verdict: GamedayVerdict, code: u8) -> ExperimentOutcome {
        ExperimentOutcome {
            verdict,
            exit_code: Some(code),
            ..Default::default()
        }
    }

    #[test]
    fn the_most_serious_outcome_wins() {
        assert_eq!(
            overall(&[e(GamedayVerdict::Passed, 0), e(GamedayVerdict::Passed, 0)]),
            (GamedayVerdict::Passed, 0)
        );
        assert_eq!(
            overall(&[e(GamedayVerdict::Failed, 1), e(GamedayVerdict::Passed, 0)]),
            (GamedayVerdict::Failed, 1)
        );
        assert_eq!(
            overall(&[
                e(GamedayVerdict::Failed, 1),
                e(GamedayVerdict::RevertFailed, 4),
                e(GamedayVerdict::Aborted, 2)
            ]),
            (GamedayVerdict::RevertFailed, 4)
        );
        assert_eq!(
            overall(&[e(GamedayVerdict::Error, 64), e(GamedayVerdict::Failed, 1)]),
            (GamedayVerdict::Error, 64)
        );
        assert_eq!(
            overall(&[e(GamedayVerdict::Passed, 0), e(GamedayVerdict::NotRun, 0)]),
            (GamedayVerdict::Passed, 0)
        );
    }

    #[test]
    fn run_ids_are_the_slot_in_utc() {
        let t: Timestamp = "2026-03-08T07:00:00Z".parse().unwrap();
        assert_eq!(run_id("weekly", t), "weekly-20260308T070000Z");
    }

    #[test]
    fn the_local_lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let held = lock_locally(dir.path(), "w").unwrap();
        match lock_locally(dir.path(), "w") {
            Err(NotStarted::LockedLocally(m)) => {
                assert!(m.contains(&format!("pid {}", std::process::id())), "{m}")
            }
            other => panic!("{other:?}"),
        }
        drop(held);
        lock_locally(dir.path(), "w").unwrap();
    }
}
