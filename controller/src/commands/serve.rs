//! `gpuchaos serve --gameday FILE...`: run game days on their schedules, keep their
//! history, and offer a page and /metrics. SIGINT/SIGTERM stop it gracefully: a
//! running game day is interrupted, its faults reverted and its result recorded.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::exit::{self, CliError};
use crate::fleet::Fleet;
use crate::gameday::history::{self, GamedayVerdict, HistoryError, HistoryErrorKind, Store};
use crate::gameday::{Live, ServeExecutor, clock, exec, file, serve, web};

pub struct Options {
    pub gamedays: Vec<PathBuf>,
    pub state_dir: PathBuf,
    pub listen: String,
    pub public_url: Option<String>,
    pub run_now: bool,
}

/// The default state directory: `$XDG_STATE_HOME/gpuchaos`, else `~/.local/state/gpuchaos`.
pub fn default_state_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("gpuchaos");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/var/lib".into());
    PathBuf::from(home).join(".local/state/gpuchaos")
}

pub fn history_error(e: HistoryError) -> CliError {
    let code = match e.kind {
        HistoryErrorKind::NotFound => exit::INVALID_INPUT,
        _ => exit::IO_ERROR,
    };
    CliError::new(code, e.message)
}

/// `HOST pid N`.
pub fn controller_id() -> String {
    let host = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown-host".into());
    format!("{host} pid {}", std::process::id())
}

/// Runs recorded as running by a controller that is gone end as `interrupted`:
/// the agents reverted their faults when the lease lapsed.
fn close_orphans(store: &Store, now_ms: i64) -> Result<usize, HistoryError> {
    let mut n = 0;
    for (_, mut run) in history::summaries(&store.runs_dir(), false)? {
        if !run.is_running() {
            continue;
        }
        // A live controller holds the game day's lock for the whole run: if we
        // can take it, the one that recorded `running` is gone.
        let Ok(_flock) = exec::lock_locally(&store.dir.join("locks"), &run.gameday) else {
            continue;
        };
        run.verdict = GamedayVerdict::Interrupted;
        run.exit_code = Some(exit::ABORTED);
        run.ended_unix_ms = Some(now_ms);
        run.reason = Some(format!(
            "the controller ({}) stopped during the run without recording its end (crash or SIGKILL); the agents reverted its faults when its lease lapsed",
            run.controller
        ));
        for e in run
            .experiments
            .iter_mut()
            .filter(|e| e.verdict == GamedayVerdict::Running)
        {
            e.verdict = GamedayVerdict::Interrupted;
        }
        run.revision += 1;
        store.save(&run)?;
        n += 1;
    }
    Ok(n)
}

pub async fn run(cli_fleet: &Fleet, opts: Options) -> Result<u8, CliError> {
    if opts.gamedays.is_empty() {
        return Err(CliError::invalid(
            "serve: name at least one game-day file with --gameday FILE",
        ));
    }
    let mut gamedays = Vec::new();
    let mut errors = Vec::new();
    for f in &opts.gamedays {
        match file::load_file(f) {
            Ok(g) => gamedays.push(Arc::new(g)),
            Err(errs) => errors.extend(errs.iter().map(|e| e.to_string())),
        }
    }
    let mut names: Vec<&str> = gamedays.iter().map(|g| g.name.as_str()).collect();
    names.sort_unstable();
    for w in names.windows(2) {
        if w[0] == w[1] {
            errors.push(format!(
                "two game days are named {}: names must be unique (they name runs and locks)",
                w[0]
            ));
        }
    }
    if !errors.is_empty() {
        return Err(CliError::invalid(format!(
            "{} error{} in the game days:\n{}",
            errors.len(),
            if errors.len() == 1 { "" } else { "s" },
            errors.join("\n")
        )));
    }
    let clock: Arc<dyn clock::WallClock> = Arc::from(clock::from_env().map_err(CliError::invalid)?);
    let store = Store::open(&opts.state_dir).map_err(history_error)?;
    let added = store.sync_pending().map_err(history_error)?;
    if added > 0 {
        crate::note!(
            "history: added {added} run result{} that had waited in the state directory",
            if added == 1 { "" } else { "s" }
        );
    }
    let closed = close_orphans(&store, clock.now().as_millisecond()).map_err(history_error)?;
    if closed > 0 {
        crate::note!(
            "history: {closed} run{} left running by a controller that is gone recorded as interrupted",
            if closed == 1 { "" } else { "s" }
        );
    }
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .map_err(|e| {
            CliError::invalid(format!(
                "cannot listen on {}: {e} (choose another with --listen)",
                opts.listen
            ))
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::internal(e.to_string()))?;
    let public_url = opts
        .public_url
        .clone()
        .unwrap_or_else(|| format!("http://{addr}"));

    let runs_dir = store.runs_dir();
    let locks_dir = store.dir.join("locks");
    let store = Arc::new(Mutex::new(store));
    let live = Arc::new(Live::new(gamedays.clone(), clock.now()));
    let ctx = Arc::new(exec::Ctx {
        store: store.clone(),
        runs_dir: runs_dir.clone(),
        locks_dir,
        cli_fleet: cli_fleet.clone(),
        clock: clock.clone(),
        public_url: Some(public_url.clone()),
        controller: controller_id(),
        on_update: {
            let live = live.clone();
            Box::new(move |run, saved| live.update(run, saved))
        },
    });
    let executor = Arc::new(ServeExecutor {
        ctx: ctx.clone(),
        live: live.clone(),
    });
    let stop = CancellationToken::new();
    let web_stop = CancellationToken::new();
    let web_task = tokio::spawn(web::serve(
        listener,
        Arc::new(web::Web {
            live: live.clone(),
            store: store.clone(),
            runs_dir,
        }),
        web_stop.clone(),
    ));
    println!(
        "gpuchaos serve: {} game day{}; page {public_url}/ · metrics {public_url}/metrics · state {}",
        gamedays.len(),
        if gamedays.len() == 1 { "" } else { "s" },
        opts.state_dir.display()
    );
    let now = clock.now();
    for g in &gamedays {
        println!(
            "  {}: {}, next {}",
            g.name,
            g.schedule.describe(),
            g.schedule
                .next_after(now)
                .map(|t| g.schedule.local(t))
                .unwrap_or_else(|| "never".into())
        );
    }
    let mut loops = Vec::new();
    for g in &gamedays {
        loops.push(tokio::spawn(serve::schedule_loop(
            g.clone(),
            clock.clone(),
            executor.clone(),
            stop.clone(),
            live.next.clone(),
            opts.run_now,
        )));
    }
    // Results that could not reach the index are retried every 30 s.
    let retry = {
        let (store, live, stop) = (store.clone(), live.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(30)) => {}
                }
                let store = store.clone();
                let r = tokio::task::spawn_blocking(move || {
                    let s = store.lock().unwrap();
                    if s.pending_count() == 0 {
                        Ok(0)
                    } else {
                        s.sync_pending()
                    }
                })
                .await;
                match r {
                    Ok(Ok(n)) if n > 0 => {
                        tracing::info!("history: added {n} pending run result(s)");
                        *live.history_error.lock().unwrap() = None;
                    }
                    Ok(Err(e)) => {
                        *live.history_error.lock().unwrap() = Some(e.message.clone());
                    }
                    _ => {}
                }
            }
        })
    };

    let signal = gpuchaos_proto::signal::Terminations::install()
        .map_err(|e| CliError::internal(format!("SIGTERM handler: {e}")))?
        .recv()
        .await;
    let running: Vec<String> = live
        .running
        .lock()
        .unwrap()
        .values()
        .map(|r| r.id.clone())
        .collect();
    if running.is_empty() {
        eprintln!("gpuchaos serve: {signal}: stopping");
    } else {
        eprintln!(
            "gpuchaos serve: {signal}: stopping; interrupting {} (every fault is reverted and the result recorded)",
            running.join(", ")
        );
    }
    stop.cancel();
    for l in loops {
        let _ = l.await;
    }
    let _ = retry.await;
    web_stop.cancel();
    let _ = web_task.await;
    let store = store.lock().unwrap();
    let pending = store.pending_count();
    if pending > 0 {
        eprintln!(
            "gpuchaos serve: {pending} run result{} could not be added to {} yet; they are kept in {} and added at the next start",
            if pending == 1 { "" } else { "s" },
            store.db_path.display(),
            store.runs_dir().display()
        );
    }
    let unsaved = live.unsaved.lock().unwrap().clone();
    if !unsaved.is_empty() {
        eprintln!(
            "gpuchaos serve: {} run result{} could not be written to the state directory; here they are in full:",
            unsaved.len(),
            if unsaved.len() == 1 { "" } else { "s" }
        );
        for run in unsaved.values() {
            eprintln!("{}", serde_json::to_string(run).unwrap_or_default());
        }
        return Ok(exit::IO_ERROR);
    }
    let left = live.left_behind.lock().unwrap().clone();
    if !left.is_empty() {
        eprintln!(
            "gpuchaos serve: stopped; {} could not revert every fault: something may be left behind (see their reports: `gpuchaos history`)",
            left.join(", ")
        );
        return Ok(exit::REVERT_FAILED);
    }
    eprintln!("gpuchaos serve: stopped");
    Ok(exit::OK)
}
