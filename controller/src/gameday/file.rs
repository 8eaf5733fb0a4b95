//! The game-day file: what runs, when, for how long at most, when never, and who
//! hears about it. Loaded like an experiment: every error at once, each with line,
//! column and field path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use gpuchaos_proto::spec::HumanDuration;
use serde::Deserialize;

use super::schedule::{Blackout, BlackoutWhen, Schedule};
use crate::experiment::load::{self, Cx, LoadError};
use crate::experiment::yaml::{self, Path as FieldPath, Value};

/// The sections a game-day file may have.
pub const SECTIONS: &[&str] = &[
    "name",
    "description",
    "schedule",
    "experiments",
    "max_duration",
    "start_deadline",
    "on_failure",
    "blackouts",
    "notify",
];

/// The sections, each typed on its own so that one bad section does not hide another.
struct Raw {
    name: String,
    description: String,
    schedule: Option<RawSchedule>,
    experiments: Vec<String>,
    max_duration: Option<HumanDuration>,
    start_deadline: Option<HumanDuration>,
    on_failure: OnFailure,
    blackouts: Vec<RawBlackout>,
    notify: Vec<RawNotify>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    cron: String,
    timezone: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBlackout {
    name: String,
    #[serde(default)]
    from: Option<String>,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    cron: Option<String>,
    #[serde(default)]
    duration: Option<HumanDuration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    #[serde(default)]
    webhook: Option<String>,
    #[serde(default)]
    webhook_env: Option<String>,
    #[serde(default)]
    format: NotifyFormat,
    #[serde(default)]
    on: NotifyOn,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    timeout: Option<HumanDuration>,
}

/// What happens after an experiment that did not pass. Whatever this says, a game
/// day stops after an abort (a stop condition fired: the service is in trouble) or a
/// revert that failed (something may be left behind).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFailure {
    #[default]
    Continue,
    Stop,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyFormat {
    /// The run summary as JSON.
    #[default]
    Json,
    /// `{"text": ...}`: Slack (and Mattermost, Rocket.Chat) incoming webhooks.
    Slack,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NotifyOn {
    /// Every run, and every slot that was missed or skipped.
    #[default]
    Always,
    /// Everything but a passed run.
    Failure,
}

/// A webhook, resolved: the URL read from the environment where the file says so.
#[derive(Debug, Clone)]
pub struct Notify {
    /// For humans and the history: the URL without its path and query (they often
    /// hold the secret), or `$VAR`.
    pub label: String,
    pub url: hyper::Uri,
    pub format: NotifyFormat,
    pub on: NotifyOn,
    pub headers: Vec<(String, String)>,
    pub timeout: std::time::Duration,
}

/// A loaded, checked game day.
#[derive(Debug, Clone)]
pub struct GameDay {
    pub name: String,
    pub description: String,
    /// The file it came from.
    pub file: PathBuf,
    pub schedule: Schedule,
    /// Experiment files, resolved against the game-day file's directory, in order.
    pub experiments: Vec<PathBuf>,
    pub max_duration: std::time::Duration,
    pub start_deadline: std::time::Duration,
    pub on_failure: OnFailure,
    pub blackouts: Vec<Blackout>,
    pub notify: Vec<Notify>,
}

/// Default for `start_deadline`.
pub const DEFAULT_START_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);

/// Whether YAML text looks like a game day (it has `experiments` and `schedule`),
/// so `validate` can tell game days from experiments.
pub fn looks_like_gameday(text: &str) -> bool {
    let Ok(docs) = yaml::parse_documents(text) else {
        return false;
    };
    docs.first()
        .is_some_and(|d| d.get("experiments").is_some() || d.get("schedule").is_some())
}

/// Loads a game-day file and every experiment it names.
pub fn load_file(path: &Path) -> Result<GameDay, Vec<LoadError>> {
    let file = path.display().to_string();
    let whole = |message: String| {
        vec![LoadError {
            file: file.clone(),
            line: 0,
            column: 0,
            path: String::new(),
            message,
        }]
    };
    let text = gpuchaos_proto::files::read_text_capped(path, gpuchaos_proto::files::MAX_YAML_BYTES)
        .map_err(|e| whole(e.0))?;
    let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
    load_str(&text, &file, path, &base)
}

/// Loads game-day text read from `path`.
pub fn load_str(
    text: &str,
    file: &str,
    path: &Path,
    base: &Path,
) -> Result<GameDay, Vec<LoadError>> {
    let docs = yaml::parse_documents(text).map_err(|e| {
        let fe = gpuchaos_proto::spec::yaml_error(e).0.remove(0);
        vec![LoadError {
            file: file.to_string(),
            line: fe.line.unwrap_or(0),
            column: fe.column.unwrap_or(0),
            path: String::new(),
            message: fe.message,
        }]
    })?;
    let root = match docs.as_slice() {
        [one] => one,
        _ => {
            return Err(vec![LoadError {
                file: file.to_string(),
                line: 0,
                column: 0,
                path: String::new(),
                message: format!(
                    "a game-day file holds exactly one YAML document, this one has {}",
                    docs.len()
                ),
            }]);
        }
    };
    let mut cx = Cx::new(root, file);
    if !matches!(root.value, Value::Map(_)) {
        cx.error(
            &FieldPath::root(),
            format!(
                "a game day is a map of sections ({}), not {}",
                SECTIONS.join(", "),
                root.type_name()
            ),
        );
        return Err(cx.into_errors());
    }
    if let Value::Map(entries) = &root.value {
        for (k, _) in entries {
            if !SECTIONS.contains(&k.name.as_str()) {
                let hint = load::suggest(&k.name, SECTIONS)
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_default();
                cx.error(
                    &FieldPath::root().key(&k.name),
                    format!(
                        "unknown section{hint}: expected one of {}",
                        SECTIONS.join(", ")
                    ),
                );
            }
        }
    }
    for required in ["name", "schedule", "experiments", "max_duration"] {
        if root.get(required).is_none() {
            cx.error(&FieldPath::root(), format!("missing `{required}`"));
        }
    }
    let raw = Raw {
        name: cx.section("name").unwrap_or_default(),
        description: cx.section("description").unwrap_or_default(),
        schedule: cx.section("schedule"),
        experiments: cx.list("experiments"),
        max_duration: cx.section("max_duration"),
        start_deadline: cx.section("start_deadline"),
        on_failure: cx.section("on_failure").unwrap_or_default(),
        blackouts: cx.list("blackouts"),
        notify: cx.list("notify"),
    };
    let at = |k: &str| FieldPath::root().key(k);

    if root.get("name").is_some()
        && (raw.name.is_empty()
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            || raw.name.len() > 64)
    {
        cx.error(
            &at("name"),
            format!(
                "`{}` cannot name a game day: use 1 to 64 letters, digits, `-` and `_` (it names run ids, lock files and URLs)",
                raw.name
            ),
        );
    }
    // The expression and the zone are checked each on its own: both errors show.
    let schedule = raw.schedule.as_ref().and_then(|s| {
        let tz = super::schedule::time_zone(&s.timezone)
            .map_err(|m| cx.error(&at("schedule").key("timezone"), m))
            .ok();
        let cron = Schedule::with_tz(&s.cron, tz.clone().unwrap_or(jiff::tz::TimeZone::UTC))
            .map_err(|m| cx.error(&at("schedule").key("cron"), m))
            .ok();
        let mut sched = cron.filter(|_| tz.is_some())?;
        sched.tz_name = s.timezone.clone();
        Some(sched)
    });
    if raw.experiments.is_empty() && root.get("experiments").is_some() {
        cx.error(
            &at("experiments"),
            "lists no experiment: name at least one experiment file",
        );
    }
    let mut experiments = Vec::new();
    for (i, e) in raw.experiments.iter().enumerate() {
        let p = if Path::new(e).is_absolute() {
            PathBuf::from(e)
        } else {
            base.join(e)
        };
        match load::load_file(&p) {
            Ok(_) => {}
            Err(errs) => {
                let lines: Vec<String> = errs.iter().map(|e| format!("  {e}")).collect();
                cx.error(
                    &at("experiments").index(i),
                    format!(
                        "experiment {} does not load:\n{}",
                        p.display(),
                        lines.join("\n")
                    ),
                );
            }
        }
        experiments.push(p);
    }
    let max_duration = raw.max_duration.map(|d| d.0).unwrap_or_default();
    if raw.max_duration.is_some() && max_duration < std::time::Duration::from_secs(1) {
        cx.error(&at("max_duration"), "must be at least 1s");
    }
    let start_deadline = raw
        .start_deadline
        .map(|d| d.0)
        .unwrap_or(DEFAULT_START_DEADLINE);
    if start_deadline < std::time::Duration::from_secs(1) {
        cx.error(
            &at("start_deadline"),
            "must be at least 1s (a slot is never started at its exact instant)",
        );
    }
    let mut blackouts = Vec::new();
    for (i, b) in raw.blackouts.iter().enumerate() {
        let here = at("blackouts").index(i);
        let tz = schedule.as_ref().map(|s| s.tz.clone());
        match blackout(b, tz) {
            Ok(Some(b)) => blackouts.push(b),
            Ok(None) => {}
            Err((field, m)) => cx.error(&here.key(field), m),
        }
    }
    let mut notify = Vec::new();
    for (i, n) in raw.notify.iter().enumerate() {
        match notifier(n) {
            Ok(n) => notify.push(n),
            Err((field, m)) => cx.error(&at("notify").index(i).key(field), m),
        }
    }
    let errors = cx.into_errors();
    match schedule {
        Some(schedule) if errors.is_empty() => Ok(GameDay {
            name: raw.name,
            description: raw.description,
            file: path.to_path_buf(),
            schedule,
            experiments,
            max_duration,
            start_deadline,
            on_failure: raw.on_failure,
            blackouts,
            notify,
        }),
        _ => Err(errors),
    }
}

type FieldErr = (&'static str, String);

/// A blackout, checked. `Ok(None)`: the time zone was bad (reported elsewhere).
fn blackout(b: &RawBlackout, tz: Option<jiff::tz::TimeZone>) -> Result<Option<Blackout>, FieldErr> {
    let when = match (&b.from, &b.to, &b.cron, &b.duration) {
        (Some(from), Some(to), None, None) => {
            let Some(tz) = tz else { return Ok(None) };
            let from_t = civil_or_instant(from, &tz).map_err(|m| ("from", m))?;
            let to_t = civil_or_instant(to, &tz).map_err(|m| ("to", m))?;
            if to_t <= from_t {
                return Err(("to", format!("`{to}` is not after `{from}`")));
            }
            BlackoutWhen::Between(from_t, to_t)
        }
        (None, None, Some(cron), Some(d)) => {
            let Some(tz) = tz else { return Ok(None) };
            let s = Schedule::with_tz(cron, tz).map_err(|m| ("cron", m))?;
            if d.0.is_zero() {
                return Err(("duration", "must be above zero".into()));
            }
            BlackoutWhen::Recurring(Box::new(s), d.0)
        }
        _ => {
            return Err((
                "name",
                format!(
                    "blackout `{}` needs either `from` and `to` (dates or times in the schedule's time zone, e.g. 2026-12-18T00:00) or `cron` and `duration` (e.g. cron: \"0 9 * * MON-FRI\", duration: 3h)",
                    b.name
                ),
            ));
        }
    };
    Ok(Some(Blackout {
        name: b.name.clone(),
        when,
    }))
}

/// `2026-12-18`, `2026-12-18T09:00` (in `tz`) or an RFC 3339 instant.
fn civil_or_instant(text: &str, tz: &jiff::tz::TimeZone) -> Result<jiff::Timestamp, String> {
    if let Ok(t) = text.parse::<jiff::Timestamp>() {
        return Ok(t);
    }
    let civil = text
        .parse::<jiff::civil::DateTime>()
        .or_else(|_| text.parse::<jiff::civil::Date>().map(|d| d.to_datetime(jiff::civil::Time::midnight())))
        .map_err(|_| {
            format!("`{text}` is not a date or time: write 2026-12-18, 2026-12-18T09:00, or 2026-12-18T09:00:00Z")
        })?;
    tz.to_ambiguous_zoned(civil)
        .compatible()
        .map(|z| z.timestamp())
        .map_err(|e| format!("`{text}`: {e}"))
}

fn notifier(n: &RawNotify) -> Result<Notify, FieldErr> {
    let (raw_url, label) = match (&n.webhook, &n.webhook_env) {
        (Some(u), None) => (u.clone(), String::new()),
        (None, Some(var)) => match std::env::var(var) {
            Ok(u) if !u.is_empty() => (u, format!("${var}")),
            _ => {
                return Err((
                    "webhook_env",
                    format!("the environment variable {var} is not set: set it to the webhook URL"),
                ));
            }
        },
        _ => {
            return Err((
                "webhook",
                "give exactly one of `webhook` (a URL) and `webhook_env` (the name of an environment variable holding the URL, for secret URLs such as Slack's)".into(),
            ));
        }
    };
    let url: hyper::Uri = raw_url
        .parse()
        .map_err(|e| ("webhook", format!("`{raw_url}` is not a URL: {e}")))?;
    if !matches!(url.scheme_str(), Some("http" | "https")) || url.host().is_none() {
        return Err((
            "webhook",
            format!("`{raw_url}` is not an http(s) URL with a host"),
        ));
    }
    let label = if label.is_empty() {
        format!(
            "{}://{}",
            url.scheme_str().unwrap_or("http"),
            url.authority().map(|a| a.as_str()).unwrap_or("")
        )
    } else {
        label
    };
    let mut headers = Vec::new();
    for (k, v) in &n.headers {
        if hyper::header::HeaderName::from_bytes(k.as_bytes()).is_err() {
            return Err(("headers", format!("`{k}` is not a valid header name")));
        }
        let v = expand_env(v).map_err(|m| ("headers", format!("{k}: {m}")))?;
        if hyper::header::HeaderValue::from_str(&v).is_err() {
            return Err(("headers", format!("{k}: not a valid header value")));
        }
        headers.push((k.clone(), v));
    }
    let timeout = n
        .timeout
        .map(|d| d.0)
        .unwrap_or(std::time::Duration::from_secs(10));
    if timeout.is_zero() {
        return Err(("timeout", "must be above zero".into()));
    }
    Ok(Notify {
        label,
        url,
        format: n.format,
        on: n.on,
        headers,
        timeout,
    })
}

/// Replaces `${VAR}` with the environment variable's value (for tokens in headers).
fn expand_env(text: &str) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let Some(j) = rest[i..].find('}') else {
            return Err(format!("unclosed `${{` in `{text}`"));
        };
        let var = &rest[i + 2..i + j];
        match std::env::var(var) {
            Ok(v) => out.push_str(&v),
            Err(_) => return Err(format!("the environment variable {var} is not set")),
        }
        rest = &rest[i + j + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    const EXP: &str = "probes:\n  - name: web\n    http: {url: http://127.0.0.1:1/}\nmethod:\n  - fault: {kind: process, duration: 1s, target: {name: \"^nothing$\"}, action: pause}\n";

    #[test]
    fn a_full_game_day_loads() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", EXP);
        let gd = write(
            dir.path(),
            "gd.yaml",
            "name: weekly\nschedule: {cron: \"0 14 * * TUE\", timezone: Europe/Berlin}\nexperiments: [a.yaml, a.yaml]\nmax_duration: 30m\nblackouts:\n  - {name: freeze, from: 2026-12-18, to: \"2027-01-05T00:00\"}\n  - {name: peak, cron: \"0 9 * * MON-FRI\", duration: 3h}\nnotify:\n  - {webhook: \"https://hooks.example.com/T000/B000/secret\", format: slack, on: failure}\n",
        );
        let g = load_file(&gd).unwrap();
        assert_eq!(g.name, "weekly");
        assert_eq!(g.experiments.len(), 2);
        assert_eq!(g.start_deadline, DEFAULT_START_DEADLINE);
        assert_eq!(g.blackouts.len(), 2);
        assert_eq!(g.notify[0].label, "https://hooks.example.com");
        assert_eq!(g.notify[0].format, NotifyFormat::Slack);
    }

    #[test]
    fn every_error_at_once_with_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let gd = write(
            dir.path(),
            "gd.yaml",
            "name: \"weekly run\"\nschedule: {cron: \"0 14 * TUE\", timezone: Europe/Berln}\nexperiments: [missing.yaml]\nmax_duration: 30\nblackouts:\n  - {name: freeze, from: 2026-12-18}\nnotify:\n  - {format: slack}\n",
        );
        // Every section is checked on its own: one bad value hides nothing else.
        let errs = load_file(&gd).unwrap_err();
        let all: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        let all = all.join("\n");
        for want in [
            ":1:7: name: `weekly run` cannot name a game day",
            "schedule.cron: `0 14 * TUE` has 4 fields",
            "schedule.timezone: unknown time zone `Europe/Berln`",
            "experiments[0]: experiment",
            "missing.yaml",
            "notify[0].webhook: give exactly one of",
            "max_duration: invalid duration 30: add a unit",
            "blackouts[0].name: blackout `freeze` needs either",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
    }

    #[test]
    fn unknown_fields_are_named_with_a_suggestion() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", EXP);
        let gd = write(
            dir.path(),
            "gd.yaml",
            "name: w\nschedule: {cron: \"@daily\", timezone: UTC}\nexperiments: [a.yaml]\nmax_duration: 1h\nblackout: []\n",
        );
        let errs = load_file(&gd).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].to_string().contains("(did you mean `blackouts`?)"),
            "{}",
            errs[0]
        );
        assert_eq!(errs[0].line, 5);
    }

    #[test]
    fn env_expansion_in_headers_and_secret_urls() {
        // SAFETY-free: tests in this module read distinct variables.
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", EXP);
        let gd = write(
            dir.path(),
            "gd.yaml",
            "name: w\nschedule: {cron: \"0 * * * *\", timezone: UTC}\nexperiments: [a.yaml]\nmax_duration: 1h\nnotify:\n  - {webhook_env: GPUCHAOS_TEST_UNSET_HOOK}\n  - {webhook: \"http://127.0.0.1:9/x\", headers: {Authorization: \"Bearer ${GPUCHAOS_TEST_UNSET_TOKEN}\"}}\n",
        );
        let errs = load_file(&gd).unwrap_err();
        let all: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        let all = all.join("\n");
        assert!(
            all.contains("notify[0].webhook_env: the environment variable GPUCHAOS_TEST_UNSET_HOOK is not set"),
            "{all}"
        );
        assert!(
            all.contains("notify[1].headers: Authorization: the environment variable GPUCHAOS_TEST_UNSET_TOKEN is not set"),
            "{all}"
        );
        assert_eq!(
            expand_env("a${PATH}b").unwrap(),
            format!("a{}b", std::env::var("PATH").unwrap())
        );
    }
}
