//! The journal: an append-only file of JSON lines in the state directory.
//!
//! Before a fault touches the system, an `intent` record holding everything revert
//! needs is appended and fsynced. `applied` follows the effect, `reverted` the undo.
//! At start-up every intent without `reverted` is reverted. Compaction writes the
//! still-open records to a new file, fsyncs it and renames it over the old one: the
//! journal is never rewritten in place. A torn last line (a crash mid-write) is
//! ignored with a warning; it can only be a record whose effect never started, since
//! effects wait for the fsync.
//!
//! At run time the journal is owned by a thread of its own ([`JournalWriter`]): the
//! manager queues records and never waits on the disk; an inject waits for its
//! intent's fsync in the task that then applies the effect. Records waiting together
//! share one fsync (group commit), and compaction runs in the same queue, so records
//! stay in order.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const JOURNAL_FILE: &str = "journal.jsonl";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rec", rename_all = "snake_case")]
pub enum Record {
    Intent {
        id: String,
        kind: String,
        spec_json: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
        target: String,
        /// What revert needs (kind-specific).
        plan: serde_json::Value,
        unix_ms: u64,
    },
    Applied {
        id: String,
        unix_ms: u64,
    },
    Reverted {
        id: String,
        reason: String,
        unix_ms: u64,
    },
}

impl Record {
    pub fn id(&self) -> &str {
        match self {
            Record::Intent { id, .. }
            | Record::Applied { id, .. }
            | Record::Reverted { id, .. } => id,
        }
    }
}

/// An intent the journal has not seen reverted.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenEntry {
    pub intent: Record,
    pub applied: bool,
}

#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    file: File,
    bytes: u64,
    /// Rewrite when the file grows past this many bytes.
    compact_at: u64,
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Journal {
    /// Opens (creating) the journal in `dir` and returns the open entries found.
    pub fn open(dir: &Path) -> io::Result<(Journal, Vec<OpenEntry>)> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(JOURNAL_FILE);
        // One read serves both the replay and the check of the last line.
        let text = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        let open = parse_open(&String::from_utf8_lossy(&text), &path)?;
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        // A last line without its newline (a crash mid-write) must not run into the
        // next record: a complete record gets its newline, a torn one is cut off.
        let keep = text
            .iter()
            .rposition(|&c| c == b'\n')
            .map(|i| i + 1)
            .unwrap_or(0);
        if keep < text.len() {
            if serde_json::from_slice::<Record>(&text[keep..]).is_ok() {
                file.write_all(b"\n")?;
            } else {
                file.set_len(keep as u64)?;
                tracing::warn!(bytes = text.len() - keep, "cut a torn last journal line");
            }
            file.sync_all()?;
        }
        let bytes = file.metadata()?.len();
        fsync_dir(dir)?;
        Ok((
            Journal {
                dir: dir.to_path_buf(),
                file,
                bytes,
                compact_at: 1 << 20,
            },
            open,
        ))
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    /// Appends one record and waits until it is on disk.
    pub fn append(&mut self, rec: &Record) -> io::Result<()> {
        self.write_record(rec)?;
        self.file.sync_data()
    }

    /// Writes one record without waiting for the disk ([`Journal::sync`] does).
    fn write_record(&mut self, rec: &Record) -> io::Result<()> {
        let mut line = serde_json::to_vec(rec).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.bytes += line.len() as u64;
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    pub fn needs_compaction(&self) -> bool {
        self.bytes > self.compact_at
    }

    /// Rewrites the journal with only `open` entries: new file, fsync, rename, fsync dir.
    pub fn compact(&mut self, open: &[OpenEntry]) -> io::Result<()> {
        let tmp = self.dir.join(format!("{JOURNAL_FILE}.compact"));
        {
            let mut f = File::create(&tmp)?;
            for e in open {
                let mut line = serde_json::to_vec(&e.intent).map_err(io::Error::other)?;
                line.push(b'\n');
                f.write_all(&line)?;
                if e.applied {
                    let mut line = serde_json::to_vec(&Record::Applied {
                        id: e.intent.id().to_string(),
                        unix_ms: crate::sys::clock::unix_ms(),
                    })
                    .map_err(io::Error::other)?;
                    line.push(b'\n');
                    f.write_all(&line)?;
                }
            }
            f.sync_all()?;
        }
        std::fs::rename(&tmp, self.path())?;
        fsync_dir(&self.dir)?;
        self.file = OpenOptions::new().append(true).open(self.path())?;
        self.bytes = self.file.metadata()?.len();
        tracing::debug!(open = open.len(), bytes = self.bytes, "journal compacted");
        Ok(())
    }
}

enum Job {
    Append(
        Record,
        Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
    ),
    /// Answers once everything queued before it is on disk.
    Flush(tokio::sync::oneshot::Sender<Result<(), String>>),
    /// Compact if the file has grown past its limit (the open entries as the
    /// manager sees them when it asks).
    CompactIfLarge(Vec<OpenEntry>),
}

/// The journal on a thread of its own: appends queue without blocking the caller;
/// [`JournalWriter::append`] answers once the record is on disk.
#[derive(Debug, Clone)]
pub struct JournalWriter {
    tx: std::sync::mpsc::Sender<Job>,
    /// Set in [`JournalWriter::inline`]: records are written by the caller.
    inline: Option<std::sync::Arc<std::sync::Mutex<Journal>>>,
    path: PathBuf,
    /// The file's size past its compaction limit (kept by the thread).
    large: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Job::Append(r, _) => write!(f, "append {}", r.id()),
            Job::Flush(_) => write!(f, "flush"),
            Job::CompactIfLarge(o) => write!(f, "compact ({} open)", o.len()),
        }
    }
}

impl JournalWriter {
    /// Moves the journal onto its thread.
    pub fn start(mut journal: Journal) -> JournalWriter {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let path = journal.path();
        let large = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(
            journal.needs_compaction(),
        ));
        let large_t = std::sync::Arc::clone(&large);
        std::thread::Builder::new()
            .name("gpuchaos-journal".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Everything already waiting joins this batch: one fsync for all
                    // of its appends (group commit), compactions in their place.
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    let mut waiting = Vec::new();
                    let mut failed: Option<String> = None;
                    for job in batch {
                        match job {
                            Job::Append(rec, reply) => {
                                if let Err(e) = journal.write_record(&rec) {
                                    failed.get_or_insert(e.to_string());
                                }
                                waiting.push(reply);
                            }
                            Job::Flush(reply) => {
                                // Everything before it was written with the batch;
                                // the sync below covers it.
                                waiting.push(Some(reply));
                            }
                            Job::CompactIfLarge(open) => {
                                flush(&mut journal, &mut waiting, &mut failed);
                                if journal.needs_compaction()
                                    && let Err(e) = journal.compact(&open)
                                {
                                    tracing::error!(error = %e, "journal compaction failed");
                                }
                            }
                        }
                    }
                    flush(&mut journal, &mut waiting, &mut failed);
                    large_t.store(
                        journal.needs_compaction(),
                        std::sync::atomic::Ordering::Relaxed,
                    );
                }
            })
            .expect("spawn the journal thread");
        JournalWriter {
            tx,
            inline: None,
            path,
            large,
        }
    }

    /// A journal written on the caller's thread, each record fsynced before the
    /// call returns: for unit tests on tokio's paused clock, which moves time on
    /// whenever the runtime waits on another thread.
    pub fn inline(journal: Journal) -> JournalWriter {
        let (tx, _rx) = std::sync::mpsc::channel::<Job>();
        JournalWriter {
            tx,
            path: journal.path(),
            large: std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false)),
            inline: Some(std::sync::Arc::new(std::sync::Mutex::new(journal))),
        }
    }

    /// Writes the job here when inline; otherwise gives it back.
    fn write_inline(&self, job: Job) -> Option<Job> {
        let Some(j) = &self.inline else {
            return Some(job);
        };
        let mut j = j.lock().unwrap_or_else(|e| e.into_inner());
        match job {
            Job::Append(rec, reply) => {
                let r = j.append(&rec).map_err(|e| e.to_string());
                if let Some(reply) = reply {
                    let _ = reply.send(r);
                }
            }
            Job::CompactIfLarge(open) => {
                if j.needs_compaction() {
                    let _ = j.compact(&open);
                }
            }
            Job::Flush(reply) => {
                let _ = reply.send(Ok(()));
            }
        }
        self.large
            .store(j.needs_compaction(), std::sync::atomic::Ordering::Relaxed);
        None
    }

    /// Whether the file has grown past its compaction limit.
    pub fn needs_compaction(&self) -> bool {
        self.large.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues a record; the answer comes once it is on disk (or why not).
    pub fn append(&self, rec: Record) -> tokio::sync::oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let Some(job) = self.write_inline(Job::Append(rec, Some(tx))) else {
            return rx;
        };
        if let Err(std::sync::mpsc::SendError(Job::Append(_, Some(reply)))) = self.tx.send(job) {
            let _ = reply.send(Err("the journal thread is gone".into()));
        }
        rx
    }

    /// Queues a record whose durability nobody waits for (`applied`, `reverted`: the
    /// intent already covers revert; a lost `reverted` means one more idempotent
    /// revert at start-up). Failures are logged.
    pub fn append_later(&self, rec: Record) {
        if let Some(job) = self.write_inline(Job::Append(rec, None)) {
            let _ = self.tx.send(job);
        }
    }

    /// Answers once every record queued before the call is on disk (a clean exit
    /// waits for it, so that a reverted fault is never "recovered" at the next start).
    pub fn flush(&self) -> tokio::sync::oneshot::Receiver<Result<(), String>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Some(job) = self.write_inline(Job::Flush(tx))
            && let Err(std::sync::mpsc::SendError(Job::Flush(reply))) = self.tx.send(job)
        {
            let _ = reply.send(Err("the journal thread is gone".into()));
        }
        rx
    }

    /// Compacts once the file has grown past its limit.
    pub fn compact_if_large(&self, open: Vec<OpenEntry>) {
        if let Some(job) = self.write_inline(Job::CompactIfLarge(open)) {
            let _ = self.tx.send(job);
        }
    }
}

fn flush(
    journal: &mut Journal,
    waiting: &mut Vec<Option<tokio::sync::oneshot::Sender<Result<(), String>>>>,
    failed: &mut Option<String>,
) {
    if waiting.is_empty() {
        return;
    }
    if failed.is_none()
        && let Err(e) = journal.sync()
    {
        *failed = Some(e.to_string());
    }
    let result = match failed.take() {
        Some(e) => {
            tracing::error!(error = %e, path = %journal.path().display(), "journal write failed");
            Err(e)
        }
        None => Ok(()),
    };
    for w in waiting.drain(..).flatten() {
        let _ = w.send(result.clone());
    }
}

/// Reads a journal file and returns the intents not marked reverted, in order.
pub fn read_open(path: &Path) -> io::Result<Vec<OpenEntry>> {
    parse_open(&std::fs::read_to_string(path)?, path)
}

/// The intents not marked reverted in a journal's text (read from `path`).
fn parse_open(text: &str, path: &Path) -> io::Result<Vec<OpenEntry>> {
    let mut open: Vec<OpenEntry> = Vec::new();
    let lines: Vec<&str> = text.lines().collect();
    let n = lines.len();
    for (i, line) in lines.into_iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let rec: Record = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) if i + 1 == n => {
                tracing::warn!(line = i + 1, error = %e, "ignoring a torn last journal line (crash mid-write)");
                continue;
            }
            Err(e) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} line {}: unreadable record ({e}); move the file aside to start, and check by hand what it recorded",
                        path.display(),
                        i + 1
                    ),
                ));
            }
        };
        match rec {
            Record::Intent { .. } => open.push(OpenEntry {
                intent: rec,
                applied: false,
            }),
            Record::Applied { id, .. } => {
                if let Some(e) = open.iter_mut().find(|e| e.intent.id() == id) {
                    e.applied = true;
                }
            }
            Record::Reverted { id, .. } => open.retain(|e| e.intent.id() != id),
        }
    }
    Ok(open)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn intent(id: &str) -> Record {
        Record::Intent {
            id: id.into(),
            kind: "process".into(),
            spec_json: "{}".into(),
            session: None,
            target: "pid 1".into(),
            plan: serde_json::json!({"targets": [{"pid": 10, "start_time": 5}]}),
            unix_ms: 1,
        }
    }

    #[test]
    fn open_entries_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, open) = Journal::open(dir.path()).unwrap();
        assert!(open.is_empty());
        j.append(&intent("a")).unwrap();
        j.append(&intent("b")).unwrap();
        j.append(&Record::Applied {
            id: "a".into(),
            unix_ms: 2,
        })
        .unwrap();
        j.append(&Record::Reverted {
            id: "b".into(),
            reason: "revert".into(),
            unix_ms: 3,
        })
        .unwrap();
        drop(j);
        let (_j, open) = Journal::open(dir.path()).unwrap();
        assert_eq!(open.len(), 1);
        assert_eq!(open[0].intent.id(), "a");
        assert!(open[0].applied);
    }

    #[test]
    fn torn_last_line_is_ignored_but_corruption_elsewhere_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.append(&intent("a")).unwrap();
        drop(j);
        let path = dir.path().join(JOURNAL_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"rec\":\"intent\",\"id\":\"b\",\"ki")
            .unwrap();
        drop(f);
        let (_, open) = Journal::open(dir.path()).unwrap();
        assert_eq!(open.len(), 1);
        // Garbage in the middle is not silently skipped.
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, format!("garbage\n{text}\n")).unwrap();
        let e = Journal::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn compaction_renames_and_keeps_only_open() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        for i in 0..50 {
            j.append(&intent(&format!("f{i}"))).unwrap();
            j.append(&Record::Reverted {
                id: format!("f{i}"),
                reason: "x".into(),
                unix_ms: 0,
            })
            .unwrap();
        }
        j.append(&intent("keep")).unwrap();
        let before = std::fs::metadata(j.path()).unwrap().len();
        let open = read_open(&j.path()).unwrap();
        j.compact(&open).unwrap();
        let after = std::fs::metadata(j.path()).unwrap().len();
        assert!(after < before / 10, "{after} vs {before}");
        j.append(&Record::Applied {
            id: "keep".into(),
            unix_ms: 0,
        })
        .unwrap();
        let open = read_open(&j.path()).unwrap();
        assert_eq!(open.len(), 1);
        assert!(open[0].applied);
        assert!(!dir.path().join(format!("{JOURNAL_FILE}.compact")).exists());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_writer_thread_keeps_order_and_answers_once_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = Journal::open(dir.path()).unwrap();
        let w = JournalWriter::start(j);
        // Many appends at once: every one answered, all on disk, in order.
        let waits: Vec<_> = (0..200)
            .map(|i| w.append(intent(&format!("f{i}"))))
            .collect();
        for r in waits {
            r.await.unwrap().unwrap();
        }
        w.append_later(Record::Reverted {
            id: "f0".into(),
            reason: "x".into(),
            unix_ms: 0,
        });
        // An answered append is durable and comes after everything queued before it.
        w.append(intent("last")).await.unwrap().unwrap();
        let open = read_open(&dir.path().join(JOURNAL_FILE)).unwrap();
        assert_eq!(open.len(), 200);
        assert_eq!(open[0].intent.id(), "f1");
        assert_eq!(open[199].intent.id(), "last");
    }

    #[test]
    fn a_torn_tail_is_cut_so_the_next_record_stays_readable() {
        let dir = tempfile::tempdir().unwrap();
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.append(&intent("a")).unwrap();
        drop(j);
        let path = dir.path().join(JOURNAL_FILE);
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"rec\":\"intent\",\"id\":\"torn").unwrap();
        drop(f);
        // Restart: the torn bytes go, and a record appended now is read back.
        let (mut j, open) = Journal::open(dir.path()).unwrap();
        assert_eq!(open.len(), 1);
        j.append(&intent("b")).unwrap();
        drop(j);
        let (_, open) = Journal::open(dir.path()).unwrap();
        let ids: Vec<&str> = open.iter().map(|e| e.intent.id()).collect();
        assert_eq!(ids, ["a", "b"]);
        // A complete record that lost only its newline is kept, not cut.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(&serde_json::to_vec(&intent("c")).unwrap())
            .unwrap();
        drop(f);
        let (mut j, _) = Journal::open(dir.path()).unwrap();
        j.append(&intent("d")).unwrap();
        drop(j);
        let (_, open) = Journal::open(dir.path()).unwrap();
        let ids: Vec<&str> = open.iter().map(|e| e.intent.id()).collect();
        assert_eq!(ids, ["a", "b", "c", "d"]);
    }
}
