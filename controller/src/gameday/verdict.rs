//! A game-day run's verdict and each of its experiments' verdicts, as the summaries
//! (`run.json`), the index (`history.db`), the page, the notifications and
//! `gpuchaos history` have always spelled them.
//!
//! The text is the boundary: serde, SQLite and `Display` all go through
//! [`GamedayVerdict::as_str`] and [`GamedayVerdict::parse`]. A verdict this version
//! does not know (written by a newer gpuchaos, say) is kept as
//! [`GamedayVerdict::Other`] with its text, rather than failing the read: the run
//! still lists, shows and is saved again under the same word, and it counts as the
//! most serious outcome (as any unknown word always did).

use std::fmt;

use rusqlite::types::{FromSql, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::runner::record::Verdict;

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum GamedayVerdict {
    /// The run (or experiment) is under way.
    Running,
    Passed,
    Failed,
    Aborted,
    InjectFailed,
    /// Something may be left behind.
    RevertFailed,
    Error,
    /// The controller died (or was killed) during the run.
    Interrupted,
    /// Slots that were not started in time (a row may stand for several).
    Missed,
    /// A slot that was not started on purpose (blackout, a run under way, another
    /// controller holding the game day).
    Skipped,
    /// An experiment the game day stopped before. Also the default: what an
    /// outcome is before anything happened to it (never saved as such: every run and
    /// experiment is given its verdict before it is recorded).
    #[default]
    NotRun,
    /// A word this version does not know, kept as it was read.
    Other(String),
}

impl GamedayVerdict {
    /// Every verdict this version knows.
    pub const KNOWN: [GamedayVerdict; 11] = [
        GamedayVerdict::Running,
        GamedayVerdict::Passed,
        GamedayVerdict::Failed,
        GamedayVerdict::Aborted,
        GamedayVerdict::InjectFailed,
        GamedayVerdict::RevertFailed,
        GamedayVerdict::Error,
        GamedayVerdict::Interrupted,
        GamedayVerdict::Missed,
        GamedayVerdict::Skipped,
        GamedayVerdict::NotRun,
    ];

    pub fn as_str(&self) -> &str {
        match self {
            GamedayVerdict::Running => "running",
            GamedayVerdict::Passed => "passed",
            GamedayVerdict::Failed => "failed",
            GamedayVerdict::Aborted => "aborted",
            GamedayVerdict::InjectFailed => "inject-failed",
            GamedayVerdict::RevertFailed => "revert-failed",
            GamedayVerdict::Error => "error",
            GamedayVerdict::Interrupted => "interrupted",
            GamedayVerdict::Missed => "missed",
            GamedayVerdict::Skipped => "skipped",
            GamedayVerdict::NotRun => "not-run",
            GamedayVerdict::Other(text) => text,
        }
    }

    /// The verdict spelled `text`; an unknown word becomes [`GamedayVerdict::Other`].
    pub fn parse(text: &str) -> GamedayVerdict {
        GamedayVerdict::KNOWN
            .into_iter()
            .find(|v| v.as_str() == text)
            .unwrap_or_else(|| GamedayVerdict::Other(text.to_string()))
    }
}

impl From<Verdict> for GamedayVerdict {
    fn from(v: Verdict) -> Self {
        match v {
            Verdict::Passed => GamedayVerdict::Passed,
            Verdict::Failed => GamedayVerdict::Failed,
            Verdict::Aborted => GamedayVerdict::Aborted,
            Verdict::InjectFailed => GamedayVerdict::InjectFailed,
            Verdict::RevertFailed => GamedayVerdict::RevertFailed,
            Verdict::Error => GamedayVerdict::Error,
        }
    }
}

impl fmt::Display for GamedayVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for GamedayVerdict {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for GamedayVerdict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        Ok(GamedayVerdict::parse(&text))
    }
}

impl ToSql for GamedayVerdict {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::from(self.as_str()))
    }
}

impl FromSql for GamedayVerdict {
    fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
        value.as_str().map(GamedayVerdict::parse)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_verdict_is_spelled_as_before_and_reads_back() {
        let words = [
            "running",
            "passed",
            "failed",
            "aborted",
            "inject-failed",
            "revert-failed",
            "error",
            "interrupted",
            "missed",
            "skipped",
            "not-run",
        ];
        for (v, word) in GamedayVerdict::KNOWN.iter().zip(words) {
            assert_eq!(v.as_str(), word);
            assert_eq!(v.to_string(), word);
            assert_eq!(GamedayVerdict::parse(word), *v);
            let json = serde_json::to_string(v).unwrap();
            assert_eq!(json, format!("\"{word}\""));
            assert_eq!(serde_json::from_str::<GamedayVerdict>(&json).unwrap(), *v);
        }
        assert_eq!(GamedayVerdict::KNOWN.len(), words.len());
    }

    #[test]
    fn an_unknown_verdict_is_kept_word_for_word() {
        let v: GamedayVerdict = serde_json::from_str("\"timed-out\"").unwrap();
        assert_eq!(v, GamedayVerdict::Other("timed-out".into()));
        assert_eq!(serde_json::to_string(&v).unwrap(), "\"timed-out\"");
        assert_eq!(v.to_string(), "timed-out");
        // Not to be confused with a known word spelled differently.
        assert_eq!(
            GamedayVerdict::parse("Passed"),
            GamedayVerdict::Other("Passed".into())
        );
    }

    #[test]
    fn verdicts_go_through_sqlite_as_their_words() {
        let db = rusqlite::Connection::open_in_memory().unwrap();
        db.execute_batch("CREATE TABLE t (verdict TEXT NOT NULL)")
            .unwrap();
        let mut all = GamedayVerdict::KNOWN.to_vec();
        all.push(GamedayVerdict::Other("timed-out".into()));
        for v in &all {
            db.execute("INSERT INTO t (verdict) VALUES (?1)", [v])
                .unwrap();
            let text: String = db
                .query_row("SELECT verdict FROM t", [], |r| r.get(0))
                .unwrap();
            assert_eq!(text, v.as_str());
            let back: GamedayVerdict = db
                .query_row("SELECT verdict FROM t", [], |r| r.get(0))
                .unwrap();
            assert_eq!(back, *v);
            db.execute("DELETE FROM t", []).unwrap();
        }
        let e = db
            .query_row("SELECT 7", [], |r| r.get::<_, GamedayVerdict>(0))
            .unwrap_err();
        assert!(matches!(e, rusqlite::Error::InvalidColumnType(..)), "{e:?}");
    }

    #[test]
    fn a_run_verdict_maps_onto_the_same_word() {
        for v in [
            Verdict::Passed,
            Verdict::Failed,
            Verdict::Aborted,
            Verdict::InjectFailed,
            Verdict::RevertFailed,
            Verdict::Error,
        ] {
            assert_eq!(GamedayVerdict::from(v).as_str(), v.as_str());
        }
    }
}
