//! Run history: a state directory with one folder per run and an SQLite index.
//!
//! ```text
//! STATE/history.db             the index (runs, experiments with their journals,
//!                              objectives, notifications)
//! STATE/runs/ID/run.json       the run's summary: the source of truth
//! STATE/runs/ID/NN-NAME/       each experiment's reports (journal.json, report.html, ...)
//! STATE/runs/ID/.pending       the summary is not in the index yet
//! STATE/locks/GAMEDAY.lock     held while that game day runs
//! ```
//!
//! A run's summary is written to its folder (atomically, synced) *before* the index
//! is touched, with a `.pending` marker that goes only once the index has it. A
//! locked or damaged database therefore never loses a result: the next `serve` or
//! `history` adds what is pending, and a damaged index can be rebuilt from the
//! folders.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, OptionalExtension, params};
use serde::{Deserialize, Serialize};

pub use super::verdict::GamedayVerdict;

/// The summary format version.
pub const FORMAT: u32 = 1;
/// The index's schema version (`PRAGMA user_version`).
const SCHEMA: i64 = 1;
/// How long to wait for another process's lock on the database.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// One game-day run, or one slot that did not run (missed, skipped).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GamedayRun {
    pub format: u32,
    pub id: String,
    pub gameday: String,
    /// The game-day file.
    pub file: String,
    /// schedule | catch-up | manual
    pub trigger: String,
    /// The scheduled time (Unix ms); none for manual runs.
    pub slot_unix_ms: Option<i64>,
    /// For `missed`: how many slots this row stands for.
    #[serde(default)]
    pub missed_slots: u32,
    /// Bumped at every save: the index never takes an older state over a newer one.
    #[serde(default)]
    pub revision: u64,
    pub started_unix_ms: i64,
    pub ended_unix_ms: Option<i64>,
    /// running | passed | failed | aborted | inject-failed | revert-failed | error |
    /// interrupted (the controller died during the run) | missed | skipped
    pub verdict: GamedayVerdict,
    pub exit_code: Option<u8>,
    pub reason: Option<String>,
    /// `HOST pid N`: who ran it.
    pub controller: String,
    pub experiments: Vec<ExperimentOutcome>,
    #[serde(default)]
    pub notifications: Vec<NotificationOutcome>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExperimentOutcome {
    pub seq: u32,
    pub name: String,
    pub file: String,
    /// As the run's verdicts, or `not-run`.
    pub verdict: GamedayVerdict,
    pub exit_code: Option<u8>,
    pub reason: Option<String>,
    /// The report folder, relative to the run's folder.
    pub report_dir: Option<String>,
    pub duration_ms: u64,
    pub objectives: Vec<ObjectiveOutcome>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectiveOutcome {
    pub name: String,
    pub kind: String,
    pub unit: String,
    pub measured: Option<f64>,
    pub limit: String,
    pub passed: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NotificationOutcome {
    pub target: String,
    pub ok: bool,
    pub attempts: u32,
    pub error: Option<String>,
    pub at_unix_ms: i64,
}

impl GamedayRun {
    pub fn is_running(&self) -> bool {
        self.verdict == GamedayVerdict::Running
    }

    /// Whether the slot ran at all (as opposed to missed or skipped).
    pub fn ran(&self) -> bool {
        !matches!(
            self.verdict,
            GamedayVerdict::Missed | GamedayVerdict::Skipped
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryErrorKind {
    Locked,
    Damaged,
    Io,
    NotFound,
}

#[derive(Debug, Clone)]
pub struct HistoryError {
    pub kind: HistoryErrorKind,
    pub message: String,
}

impl fmt::Display for HistoryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for HistoryError {}

/// The state directory and its index.
pub struct Store {
    pub dir: PathBuf,
    pub db_path: PathBuf,
    conn: Connection,
    busy_timeout: Duration,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

impl Store {
    /// Opens (creating if needed) the state directory and its index, and checks that
    /// the index is a readable database of a schema this version knows.
    pub fn open(dir: &Path) -> Result<Store, HistoryError> {
        Store::open_with_timeout(dir, BUSY_TIMEOUT)
    }

    /// [`open`](Store::open), waiting at most `busy_timeout` for another process's lock.
    pub fn open_with_timeout(dir: &Path, busy_timeout: Duration) -> Result<Store, HistoryError> {
        for sub in ["runs", "locks"] {
            std::fs::create_dir_all(dir.join(sub)).map_err(|e| HistoryError {
                kind: HistoryErrorKind::Io,
                message: format!(
                    "cannot create the state directory {}: {e} (choose another with --state-dir)",
                    dir.join(sub).display()
                ),
            })?;
        }
        let db_path = dir.join("history.db");
        let conn =
            Connection::open(&db_path).map_err(|e| db_error(&db_path, dir, busy_timeout, &e))?;
        let store = Store {
            dir: dir.to_path_buf(),
            db_path,
            conn,
            busy_timeout,
        };
        store
            .conn
            .busy_timeout(busy_timeout)
            .map_err(|e| store.err(&e))?;
        store.init().map_err(|e| store.err(&e))?;
        Ok(store)
    }

    fn init(&self) -> rusqlite::Result<()> {
        // Reading the schema version touches the file's header: a file that is not
        // a database fails here, before anything is written.
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > SCHEMA {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_MISMATCH),
                Some(format!(
                    "schema version {version} is newer than this gpuchaos knows ({SCHEMA}): use the gpuchaos that wrote it"
                )),
            ));
        }
        let _: String = self
            .conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        let check: String = self
            .conn
            .query_row("PRAGMA quick_check", [], |r| r.get(0))?;
        if check != "ok" {
            return Err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                Some(check),
            ));
        }
        if version < SCHEMA {
            self.conn.execute_batch(
                "BEGIN IMMEDIATE;
                 CREATE TABLE IF NOT EXISTS runs (
                    id TEXT PRIMARY KEY,
                    gameday TEXT NOT NULL,
                    trigger TEXT NOT NULL,
                    slot_unix_ms INTEGER,
                    started_unix_ms INTEGER NOT NULL,
                    ended_unix_ms INTEGER,
                    verdict TEXT NOT NULL,
                    exit_code INTEGER,
                    revision INTEGER NOT NULL DEFAULT 0,
                    summary TEXT NOT NULL
                 );
                 CREATE INDEX IF NOT EXISTS runs_by_gameday ON runs(gameday, started_unix_ms);
                 CREATE TABLE IF NOT EXISTS experiments (
                    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
                    seq INTEGER NOT NULL,
                    name TEXT NOT NULL,
                    verdict TEXT NOT NULL,
                    journal TEXT,
                    PRIMARY KEY (run_id, seq)
                 );
                 CREATE TABLE IF NOT EXISTS objectives (
                    run_id TEXT NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
                    seq INTEGER NOT NULL,
                    experiment TEXT NOT NULL,
                    objective TEXT NOT NULL,
                    kind TEXT NOT NULL,
                    unit TEXT NOT NULL,
                    measured REAL,
                    passed INTEGER NOT NULL,
                    PRIMARY KEY (run_id, seq, objective)
                 );
                 PRAGMA user_version = 1;
                 COMMIT;",
            )?;
        }
        Ok(())
    }

    fn err(&self, e: &rusqlite::Error) -> HistoryError {
        db_error(&self.db_path, &self.dir, self.busy_timeout, e)
    }

    pub fn runs_dir(&self) -> PathBuf {
        self.dir.join("runs")
    }

    pub fn run_dir(&self, id: &str) -> PathBuf {
        self.runs_dir().join(id)
    }

    /// Writes the run's summary to its folder, then into the index. An index error
    /// is returned, but the summary is safe on disk and stays pending.
    pub fn save(&self, run: &GamedayRun) -> Result<(), HistoryError> {
        write_summary(&self.run_dir(&run.id), run)?;
        self.index(run)?;
        let _ = std::fs::remove_file(self.run_dir(&run.id).join(".pending"));
        Ok(())
    }

    fn index(&self, run: &GamedayRun) -> Result<(), HistoryError> {
        let dir = self.run_dir(&run.id);
        let summary = serde_json::to_string(run).map_err(|e| HistoryError {
            kind: HistoryErrorKind::Io,
            message: e.to_string(),
        })?;
        let go = || -> rusqlite::Result<()> {
            // IMMEDIATE: the write lock first, so the revision check and the
            // write see the same database.
            let tx = rusqlite::Transaction::new_unchecked(
                &self.conn,
                rusqlite::TransactionBehavior::Immediate,
            )?;
            let stored: Option<i64> = tx
                .query_row("SELECT revision FROM runs WHERE id = ?1", [&run.id], |r| {
                    r.get(0)
                })
                .optional()?;
            let revision = i64::try_from(run.revision).unwrap_or(i64::MAX);
            if stored.is_some_and(|s| s > revision) {
                return Ok(()); // a newer state is already indexed
            }
            tx.execute("DELETE FROM experiments WHERE run_id = ?1", [&run.id])?;
            tx.execute("DELETE FROM objectives WHERE run_id = ?1", [&run.id])?;
            tx.execute(
                "INSERT OR REPLACE INTO runs (id, gameday, trigger, slot_unix_ms, started_unix_ms, ended_unix_ms, verdict, exit_code, revision, summary)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    run.id,
                    run.gameday,
                    run.trigger,
                    run.slot_unix_ms,
                    run.started_unix_ms,
                    run.ended_unix_ms,
                    run.verdict,
                    run.exit_code,
                    revision,
                    summary
                ],
            )?;
            for e in &run.experiments {
                let journal = e
                    .report_dir
                    .as_ref()
                    .and_then(|d| std::fs::read_to_string(dir.join(d).join("journal.json")).ok());
                tx.execute(
                    "INSERT INTO experiments (run_id, seq, name, verdict, journal) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![run.id, e.seq, e.name, e.verdict, journal],
                )?;
                for o in &e.objectives {
                    tx.execute(
                        "INSERT OR REPLACE INTO objectives (run_id, seq, experiment, objective, kind, unit, measured, passed)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        params![run.id, e.seq, e.name, o.name, o.kind, o.unit, o.measured, o.passed],
                    )?;
                }
            }
            tx.commit()
        };
        go().map_err(|e| self.err(&e))
    }

    /// Adds every pending summary to the index; returns how many were added.
    pub fn sync_pending(&self) -> Result<usize, HistoryError> {
        let mut n = 0;
        for (dir, run) in self.summaries(true)? {
            self.index(&run)?;
            let _ = std::fs::remove_file(dir.join(".pending"));
            n += 1;
        }
        Ok(n)
    }

    /// Re-indexes every run folder (after the index was lost or damaged).
    pub fn rebuild(&self) -> Result<usize, HistoryError> {
        let runs = self.summaries(false)?;
        for (dir, run) in &runs {
            self.index(run)?;
            let _ = std::fs::remove_file(dir.join(".pending"));
        }
        Ok(runs.len())
    }

    /// How many summaries wait for the index.
    pub fn pending_count(&self) -> usize {
        pending_count(&self.runs_dir())
    }

    fn summaries(&self, pending_only: bool) -> Result<Vec<(PathBuf, GamedayRun)>, HistoryError> {
        summaries(&self.runs_dir(), pending_only)
    }

    /// Runs, newest first.
    pub fn list(
        &self,
        gameday: Option<&str>,
        limit: usize,
    ) -> Result<Vec<GamedayRun>, HistoryError> {
        let go = || -> rusqlite::Result<Vec<String>> {
            let mut stmt = self.conn.prepare(
                "SELECT summary FROM runs WHERE (?1 IS NULL OR gameday = ?1)
                 ORDER BY started_unix_ms DESC, id DESC LIMIT ?2",
            )?;
            let rows = stmt.query_map(params![gameday, limit as i64], |r| r.get(0))?;
            rows.collect()
        };
        let texts = go().map_err(|e| self.err(&e))?;
        Ok(texts
            .iter()
            .filter_map(|t| serde_json::from_str(t).ok())
            .collect())
    }

    /// The latest `limit` runs of a game day that ran (neither missed, skipped nor
    /// still running), newest first, and how many it has in all: the page's trends.
    pub fn ran_runs(
        &self,
        gameday: &str,
        limit: usize,
    ) -> Result<(Vec<GamedayRun>, usize), HistoryError> {
        const RAN: &str = "gameday = ?1 AND verdict NOT IN ('missed', 'skipped', 'running')";
        let go = || -> rusqlite::Result<(Vec<String>, i64)> {
            let mut stmt = self.conn.prepare(&format!(
                "SELECT summary FROM runs WHERE {RAN} ORDER BY started_unix_ms DESC, id DESC LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![gameday, limit as i64], |r| r.get(0))?;
            let texts = rows.collect::<rusqlite::Result<Vec<String>>>()?;
            let total = self.conn.query_row(
                &format!("SELECT count(*) FROM runs WHERE {RAN}"),
                [gameday],
                |r| r.get(0),
            )?;
            Ok((texts, total))
        };
        let (texts, total) = go().map_err(|e| self.err(&e))?;
        Ok((
            texts
                .iter()
                .filter_map(|t| serde_json::from_str(t).ok())
                .collect(),
            usize::try_from(total).unwrap_or(0),
        ))
    }

    /// One run by id, or by a unique prefix of its id, or `last`/`GAMEDAY:last`.
    pub fn get(&self, id: &str) -> Result<GamedayRun, HistoryError> {
        let not_found = |m: String| HistoryError {
            kind: HistoryErrorKind::NotFound,
            message: m,
        };
        if id == "last" || id.ends_with(":last") {
            let gd = id.strip_suffix(":last");
            return self
                .list(gd, 50)?
                .into_iter()
                .find(GamedayRun::ran)
                .ok_or_else(|| not_found("no run in the history yet".into()));
        }
        let go = || -> rusqlite::Result<Vec<String>> {
            let mut stmt = self.conn.prepare(
                "SELECT summary FROM runs WHERE id = ?1 OR substr(id, 1, length(?1)) = ?1 ORDER BY id LIMIT 10",
            )?;
            let rows = stmt.query_map([id], |r| r.get(0))?;
            rows.collect()
        };
        let texts = go().map_err(|e| self.err(&e))?;
        let runs: Vec<GamedayRun> = texts
            .iter()
            .filter_map(|t| serde_json::from_str(t).ok())
            .collect();
        if let Some(exact) = runs.iter().find(|r| r.id == id) {
            return Ok(exact.clone());
        }
        match runs.as_slice() {
            [one] => Ok(one.clone()),
            [] => Err(not_found(format!(
                "no run `{id}` in the history ({}): `gpuchaos history` lists the runs",
                self.db_path.display()
            ))),
            many => Err(not_found(format!(
                "`{id}` matches several runs ({}): give more of the id",
                many.iter()
                    .map(|r| r.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// An experiment's journal (`journal.json`) as stored in the index.
    pub fn journal(&self, run_id: &str, seq: u32) -> Result<Option<String>, HistoryError> {
        self.conn
            .query_row(
                "SELECT journal FROM experiments WHERE run_id = ?1 AND seq = ?2",
                params![run_id, seq],
                |r| r.get::<_, Option<String>>(0),
            )
            .optional()
            .map(Option::flatten)
            .map_err(|e| self.err(&e))
    }

    /// The latest slot this game day has a row for (ran, missed or skipped).
    pub fn last_slot(&self, gameday: &str) -> Result<Option<i64>, HistoryError> {
        self.conn
            .query_row(
                "SELECT max(slot_unix_ms) FROM runs WHERE gameday = ?1",
                [gameday],
                |r| r.get(0),
            )
            .map_err(|e| self.err(&e))
    }

    /// Every measured objective, oldest first, for trends.
    pub fn objective_points(&self, gameday: Option<&str>) -> Result<Vec<Point>, HistoryError> {
        let go = || -> rusqlite::Result<Vec<Point>> {
            let mut stmt = self.conn.prepare(
                "SELECT r.gameday, o.experiment, o.objective, o.kind, o.unit, r.id, r.started_unix_ms, o.measured, o.passed
                 FROM objectives o JOIN runs r ON r.id = o.run_id
                 WHERE (?1 IS NULL OR r.gameday = ?1)
                 ORDER BY r.started_unix_ms, o.seq",
            )?;
            let rows = stmt.query_map(params![gameday], |r| {
                Ok(Point {
                    gameday: r.get(0)?,
                    experiment: r.get(1)?,
                    objective: r.get(2)?,
                    kind: r.get(3)?,
                    unit: r.get(4)?,
                    run_id: r.get(5)?,
                    started_unix_ms: r.get(6)?,
                    measured: r.get(7)?,
                    passed: r.get(8)?,
                })
            })?;
            rows.collect()
        };
        go().map_err(|e| self.err(&e))
    }
}

/// One objective's measurement in one run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    pub gameday: String,
    pub experiment: String,
    pub objective: String,
    pub kind: String,
    pub unit: String,
    pub run_id: String,
    pub started_unix_ms: i64,
    pub measured: Option<f64>,
    pub passed: bool,
}

/// Writes `run.json` (and `.pending` first) into `dir`, atomically and synced.
pub fn write_summary(dir: &Path, run: &GamedayRun) -> Result<(), HistoryError> {
    let io = |what: &str, e: std::io::Error| HistoryError {
        kind: HistoryErrorKind::Io,
        message: format!("cannot {what} in {}: {e}", dir.display()),
    };
    std::fs::create_dir_all(dir).map_err(|e| io("create the run folder", e))?;
    std::fs::write(dir.join(".pending"), b"").map_err(|e| io("write .pending", e))?;
    let mut text =
        serde_json::to_string_pretty(run).map_err(|e| io("encode", std::io::Error::other(e)))?;
    text.push('\n');
    crate::report::write_atomic(&dir.join("run.json"), text.as_bytes())
        .map_err(|e| io("write run.json", e))?;
    Ok(())
}

/// How many run folders in `runs_dir` wait for the index.
pub fn pending_count(runs_dir: &Path) -> usize {
    std::fs::read_dir(runs_dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().join(".pending").exists())
                .count()
        })
        .unwrap_or(0)
}

/// The summaries in `runs_dir`'s run folders (only the pending ones if
/// `pending_only`), oldest first. Unreadable folders are logged and left out.
pub fn summaries(
    runs_dir: &Path,
    pending_only: bool,
) -> Result<Vec<(PathBuf, GamedayRun)>, HistoryError> {
    let rd = std::fs::read_dir(runs_dir).map_err(|e| HistoryError {
        kind: HistoryErrorKind::Io,
        message: format!("cannot read {}: {e}", runs_dir.display()),
    })?;
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let dir = entry.path();
        if pending_only && !dir.join(".pending").exists() {
            continue;
        }
        match read_summary(&dir) {
            Ok(run) => out.push((dir, run)),
            Err(e) => tracing::warn!("skipping {}: {e}", dir.display()),
        }
    }
    out.sort_by_key(|(_, r)| r.started_unix_ms);
    Ok(out)
}

pub fn read_summary(dir: &Path) -> Result<GamedayRun, String> {
    let p = dir.join("run.json");
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
}

fn db_error(db: &Path, dir: &Path, waited: Duration, e: &rusqlite::Error) -> HistoryError {
    let runs = dir.join("runs");
    let code = e.sqlite_error_code();
    match code {
        Some(ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked) => HistoryError {
            kind: HistoryErrorKind::Locked,
            message: format!(
                "the history database {} is locked by another process (waited {}): find it with `fuser {}` and try again. Run results are safe in {} and are added once the database is free",
                db.display(),
                humantime::format_duration(waited),
                db.display(),
                runs.display()
            ),
        },
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => HistoryError {
            kind: HistoryErrorKind::Damaged,
            message: format!(
                "the history database {} is damaged ({e}). Run results are safe in {}: move the damaged file aside (mv {} {}.damaged) and run `gpuchaos history --rebuild` to index them again",
                db.display(),
                runs.display(),
                db.display(),
                db.display()
            ),
        },
        _ => HistoryError {
            kind: HistoryErrorKind::Io,
            message: format!("the history database {}: {e}", db.display()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(
        id: &str,
        gameday: &str,
        started: i64,
        verdict: GamedayVerdict,
        rto: f64,
    ) -> GamedayRun {
        GamedayRun {
            format: FORMAT,
            id: id.into(),
            gameday: gameday.into(),
            file: "gd.yaml".into(),
            trigger: "schedule".into(),
            slot_unix_ms: Some(started),
            missed_slots: 0,
            revision: 1,
            started_unix_ms: started,
            ended_unix_ms: Some(started + 1000),
            verdict: verdict.clone(),
            exit_code: Some(if verdict == GamedayVerdict::Passed {
                0
            } else {
                1
            }),
            reason: None,
            controller: "host pid 1".into(),
            experiments: vec![ExperimentOutcome {
                seq: 1,
                name: "kill".into(),
                file: "kill.yaml".into(),
                verdict: verdict.clone(),
                exit_code: Some(0),
                reason: None,
                report_dir: None,
                duration_ms: 1000,
                objectives: vec![ObjectiveOutcome {
                    name: "rto".into(),
                    kind: "recovery_time".into(),
                    unit: "s".into(),
                    measured: Some(rto),
                    limit: "≤ 10s".into(),
                    passed: verdict == GamedayVerdict::Passed,
                }],
            }],
            notifications: vec![],
        }
    }

    #[test]
    fn saved_runs_survive_reopening_and_come_back_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.save(&sample("w-1", "w", 1000, GamedayVerdict::Passed, 2.0))
                .unwrap();
            s.save(&sample("w-2", "w", 2000, GamedayVerdict::Failed, 12.0))
                .unwrap();
            s.save(&sample("x-1", "x", 1500, GamedayVerdict::Passed, 1.0))
                .unwrap();
        }
        let s = Store::open(dir.path()).unwrap();
        let ids: Vec<String> = s
            .list(None, 10)
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["w-2", "x-1", "w-1"]);
        assert_eq!(s.list(Some("w"), 10).unwrap().len(), 2);
        assert_eq!(s.get("w-2").unwrap().verdict, GamedayVerdict::Failed);
        assert_eq!(s.get("x").unwrap().id, "x-1");
        assert!(
            s.get("w-")
                .unwrap_err()
                .message
                .contains("matches several runs")
        );
        assert_eq!(s.get("w:last").unwrap().id, "w-2");
        assert_eq!(s.last_slot("w").unwrap(), Some(2000));
        let pts = s.objective_points(Some("w")).unwrap();
        assert_eq!(
            pts.iter().map(|p| p.measured.unwrap()).collect::<Vec<_>>(),
            [2.0, 12.0]
        );
        assert_eq!(s.pending_count(), 0);
        // An older state of a run never replaces a newer one in the index.
        let mut old = sample("w-2", "w", 2000, GamedayVerdict::Running, 0.0);
        old.revision = 0;
        s.index(&old).unwrap();
        assert_eq!(s.get("w-2").unwrap().verdict, GamedayVerdict::Failed);
    }

    #[test]
    fn ran_runs_leave_out_missed_skipped_and_running_and_count_them_all() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        for (i, v) in [
            GamedayVerdict::Passed,
            GamedayVerdict::Missed,
            GamedayVerdict::Failed,
            GamedayVerdict::Skipped,
            GamedayVerdict::Error,
            GamedayVerdict::Running,
        ]
        .into_iter()
        .enumerate()
        {
            s.save(&sample(&format!("w-{i}"), "w", 1000 * i as i64, v, 1.0))
                .unwrap();
        }
        s.save(&sample("x-1", "x", 500, GamedayVerdict::Passed, 1.0))
            .unwrap();
        let (runs, total) = s.ran_runs("w", 2).unwrap();
        assert_eq!(total, 3);
        assert_eq!(
            runs.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["w-4", "w-2"]
        );
    }

    /// `run.json` as gpuchaos wrote it while verdicts were plain strings.
    const OLD_SUMMARY: &str = r#"{
  "format": 1,
  "id": "weekly-20260308T070000Z",
  "gameday": "weekly",
  "file": "gd.yaml",
  "trigger": "schedule",
  "slot_unix_ms": 1772953200000,
  "missed_slots": 0,
  "revision": 4,
  "started_unix_ms": 1772953200123,
  "ended_unix_ms": 1772953260456,
  "verdict": "revert-failed",
  "exit_code": 4,
  "reason": "kill: revert-failed (fault f-1 on agent a is left behind)",
  "controller": "host pid 42",
  "experiments": [
    {
      "seq": 1,
      "name": "kill",
      "file": "kill.yaml",
      "verdict": "passed",
      "exit_code": 0,
      "reason": null,
      "report_dir": "01-kill",
      "duration_ms": 20000,
      "objectives": [
        {
          "name": "rto",
          "kind": "recovery_time",
          "unit": "s",
          "measured": 2.5,
          "limit": "≤ 10s",
          "passed": true
        }
      ]
    },
    {
      "seq": 2,
      "name": "kill",
      "file": "kill.yaml",
      "verdict": "revert-failed",
      "exit_code": 4,
      "reason": "fault f-1 on agent a is left behind",
      "report_dir": "02-kill",
      "duration_ms": 40000,
      "objectives": []
    },
    {
      "seq": 3,
      "name": "xid",
      "file": "xid.yaml",
      "verdict": "not-run",
      "exit_code": null,
      "reason": "not run: experiment kill ended revert-failed (the game day stops after an abort or a failed revert)",
      "report_dir": null,
      "duration_ms": 0,
      "objectives": []
    }
  ],
  "notifications": [
    {
      "target": "https://hooks.example/x",
      "ok": true,
      "attempts": 1,
      "error": null,
      "at_unix_ms": 1772953260500
    }
  ]
}
"#;

    #[test]
    fn a_summary_written_with_string_verdicts_reads_and_writes_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old");
        std::fs::create_dir(&old).unwrap();
        std::fs::write(old.join("run.json"), OLD_SUMMARY).unwrap();
        let run = read_summary(&old).unwrap();
        assert_eq!(run.verdict, GamedayVerdict::RevertFailed);
        assert_eq!(
            run.experiments
                .iter()
                .map(|e| e.verdict.clone())
                .collect::<Vec<_>>(),
            [
                GamedayVerdict::Passed,
                GamedayVerdict::RevertFailed,
                GamedayVerdict::NotRun
            ]
        );
        assert!(run.ran() && !run.is_running());
        let again = dir.path().join("again");
        write_summary(&again, &run).unwrap();
        assert_eq!(
            std::fs::read_to_string(again.join("run.json")).unwrap(),
            OLD_SUMMARY
        );
        // Into the index and back, with the same words in its columns.
        let s = Store::open(&dir.path().join("state")).unwrap();
        s.save(&run).unwrap();
        assert_eq!(s.get("weekly").unwrap(), run);
        let words: Vec<String> = s
            .conn
            .prepare(
                "SELECT verdict FROM runs UNION ALL SELECT verdict FROM experiments ORDER BY 1",
            )
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            words,
            ["not-run", "passed", "revert-failed", "revert-failed"]
        );
    }

    #[test]
    fn a_run_with_a_verdict_this_version_does_not_know_still_lists() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        let newer = sample(
            "w-1",
            "w",
            1000,
            GamedayVerdict::Other("timed-out".into()),
            2.0,
        );
        s.save(&newer).unwrap();
        let text = std::fs::read_to_string(dir.path().join("runs/w-1/run.json")).unwrap();
        assert!(text.contains("\"verdict\": \"timed-out\""), "{text}");
        assert_eq!(s.list(None, 10).unwrap(), [newer]);
        assert_eq!(s.get("w-1").unwrap().verdict.as_str(), "timed-out");
    }

    #[test]
    fn a_damaged_database_says_how_to_recover_and_rebuild_finds_every_run() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = Store::open(dir.path()).unwrap();
            s.save(&sample("w-1", "w", 1000, GamedayVerdict::Passed, 2.0))
                .unwrap();
        }
        let db = dir.path().join("history.db");
        for f in ["history.db-wal", "history.db-shm"] {
            let _ = std::fs::remove_file(dir.path().join(f));
        }
        std::fs::write(&db, vec![0x5a; 8192]).unwrap();
        let e = Store::open(dir.path()).unwrap_err();
        assert_eq!(e.kind, HistoryErrorKind::Damaged, "{e}");
        assert!(
            e.message.contains("is damaged") && e.message.contains("--rebuild"),
            "{e}"
        );
        std::fs::rename(&db, dir.path().join("history.db.damaged")).unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert_eq!(s.rebuild().unwrap(), 1);
        assert_eq!(s.get("w-1").unwrap().verdict, GamedayVerdict::Passed);
    }

    #[test]
    fn a_locked_database_keeps_the_result_pending_until_it_is_free() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open_with_timeout(dir.path(), Duration::from_millis(200)).unwrap();
        let other = Connection::open(dir.path().join("history.db")).unwrap();
        other.execute_batch("BEGIN EXCLUSIVE").unwrap();
        let e = s
            .save(&sample("w-1", "w", 1000, GamedayVerdict::Passed, 2.0))
            .unwrap_err();
        assert_eq!(e.kind, HistoryErrorKind::Locked);
        assert!(e.message.contains("is locked by another process"), "{e}");
        assert!(dir.path().join("runs/w-1/run.json").exists());
        assert_eq!(s.pending_count(), 1);
        other.execute_batch("ROLLBACK").unwrap();
        assert_eq!(s.sync_pending().unwrap(), 1);
        assert_eq!(s.get("w-1").unwrap().id, "w-1");
        assert_eq!(s.pending_count(), 0);
    }
}
