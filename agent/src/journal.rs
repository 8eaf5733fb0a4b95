//! The journal: an append-only file of JSON lines in the state directory.
//!
//! Before a fault touches the system, an `intent` record holding everything revert
//! needs is appended and fsynced. `applied` follows the effect, `reverted` the undo.
//! At start-up every intent without `reverted` is reverted. Compaction writes the
//! still-open records to a new file, fsyncs it and renames it over the old one: the
//! journal is never rewritten in place. A torn last line (a crash mid-write) is
//! ignored with a warning; it can only be a record whose effect never started, since
//! effects wait for the fsync.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, Write};
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
        let open = if path.exists() {
            read_open(&path)?
        } else {
            Vec::new()
        };
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
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
        let mut line = serde_json::to_vec(rec).map_err(io::Error::other)?;
        line.push(b'\n');
        self.file.write_all(&line)?;
        self.file.sync_data()?;
        self.bytes += line.len() as u64;
        Ok(())
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

/// Reads a journal file and returns the intents not marked reverted, in order.
pub fn read_open(path: &Path) -> io::Result<Vec<OpenEntry>> {
    let f = File::open(path)?;
    let mut open: Vec<OpenEntry> = Vec::new();
    let lines: Vec<String> = io::BufReader::new(f).lines().collect::<Result<_, _>>()?;
    let n = lines.len();
    for (i, line) in lines.into_iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let rec: Record = match serde_json::from_str(&line) {
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
}
