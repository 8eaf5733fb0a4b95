//! Webhook notifications: the run's summary as JSON, or Slack-compatible text.
//! Each delivery is tried three times (1 s, then 4 s apart) on connection errors,
//! 429 and 5xx; what happened is recorded with the run.

use std::time::Duration;

use bytes::Bytes;
use serde_json::json;

use super::file::{GameDay, Notify, NotifyFormat, NotifyOn};
use super::history::{GamedayRun, GamedayVerdict, NotificationOutcome};
use crate::probe::http;

const ATTEMPTS: u32 = 3;

/// Whether `n` wants to hear about `run`.
pub fn wanted(n: &Notify, run: &GamedayRun) -> bool {
    match n.on {
        NotifyOn::Always => true,
        NotifyOn::Failure => run.verdict != GamedayVerdict::Passed,
    }
}

/// The JSON summary sent to `format: json` webhooks.
pub fn summary_json(gd: &GameDay, run: &GamedayRun, public_url: Option<&str>) -> serde_json::Value {
    let report = |dir: &Option<String>| {
        dir.as_ref().map(|d| match public_url {
            Some(base) => format!(
                "{}/runs/{}/{}/report.html",
                base.trim_end_matches('/'),
                run.id,
                d
            ),
            None => format!("{}/report.html", d),
        })
    };
    json!({
        "gameday": run.gameday,
        "run": run.id,
        "trigger": run.trigger,
        "verdict": run.verdict,
        "exit_code": run.exit_code,
        "reason": run.reason,
        "schedule": gd.schedule.describe(),
        "slot": run.slot_unix_ms.map(rfc3339),
        "started": rfc3339(run.started_unix_ms),
        "ended": run.ended_unix_ms.map(rfc3339),
        "duration_s": run.ended_unix_ms.map(|e| (e - run.started_unix_ms) as f64 / 1000.0),
        "missed_slots": run.missed_slots,
        "controller": run.controller,
        "url": public_url.map(|b| format!("{}/runs/{}/", b.trim_end_matches('/'), run.id)),
        "experiments": run.experiments.iter().map(|e| json!({
            "name": e.name,
            "file": e.file,
            "verdict": e.verdict,
            "exit_code": e.exit_code,
            "reason": e.reason,
            "report": report(&e.report_dir),
            "objectives": e.objectives.iter().map(|o| json!({
                "name": o.name,
                "kind": o.kind,
                "measured": o.measured,
                "unit": o.unit,
                "limit": o.limit,
                "passed": o.passed,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// Slack mrkdwn text: one headline, one line per experiment, failed objectives named.
pub fn slack_text(gd: &GameDay, run: &GamedayRun, public_url: Option<&str>) -> String {
    let icon = match run.verdict {
        GamedayVerdict::Passed => ":white_check_mark:",
        GamedayVerdict::Failed => ":x:",
        GamedayVerdict::Missed | GamedayVerdict::Skipped => ":warning:",
        _ => ":rotating_light:",
    };
    let passed = run
        .experiments
        .iter()
        .filter(|e| e.verdict == GamedayVerdict::Passed)
        .count();
    let mut text = format!(
        "{icon} Game day *{}* {}{}",
        run.gameday,
        run.verdict,
        run.exit_code
            .map(|c| format!(" (exit {c})"))
            .unwrap_or_default()
    );
    if run.ran() {
        text += &format!(": {passed}/{} experiments passed", run.experiments.len());
    }
    if let Some(r) = &run.reason {
        text += &format!("\n{r}");
    }
    for e in &run.experiments {
        text += &format!("\n• {}: {}", e.name, e.verdict);
        for o in e.objectives.iter().filter(|o| !o.passed) {
            text += &format!(
                " — {} {} (limit {})",
                o.name,
                o.measured
                    .map(|v| crate::report::format_value(v, &o.unit))
                    .unwrap_or_else(|| "not measured".into()),
                o.limit
            );
        }
    }
    text += &format!("\n{} · run {}", gd.schedule.describe(), run.id);
    if let Some(base) = public_url {
        text += &format!(
            " · <{}/runs/{}/|reports>",
            base.trim_end_matches('/'),
            run.id
        );
    }
    text
}

/// Sends one notification, retrying; never fails, the outcome says what happened.
pub async fn deliver(n: &Notify, body: Bytes) -> NotificationOutcome {
    let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
    headers.extend(n.headers.iter().cloned());
    let req = http::Request {
        method: hyper::Method::POST,
        url: n.url.clone(),
        headers,
        body: Some(body),
    };
    let tls = if n.url.scheme_str() == Some("https") {
        match http::tls_config(None) {
            Ok(t) => Some(t),
            Err(e) => {
                return NotificationOutcome {
                    target: n.label.clone(),
                    ok: false,
                    attempts: 0,
                    error: Some(e),
                    at_unix_ms: now_ms(),
                };
            }
        }
    } else {
        None
    };
    let mut last_error = None;
    let mut attempts = 0;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(4u64.pow(attempt - 1))).await;
        }
        attempts += 1;
        let r = tokio::time::timeout(n.timeout, http::send(&req, tls.as_ref())).await;
        let (retry, error) = match r {
            Ok(Ok(resp)) if (200..300).contains(&resp.status) => {
                return NotificationOutcome {
                    target: n.label.clone(),
                    ok: true,
                    attempts,
                    error: None,
                    at_unix_ms: now_ms(),
                };
            }
            Ok(Ok(resp)) => (
                resp.status == 429 || resp.status >= 500,
                format!(
                    "HTTP {}: {}",
                    resp.status,
                    String::from_utf8_lossy(&resp.body[..resp.body.len().min(200)])
                ),
            ),
            Ok(Err(e)) => (true, e),
            Err(_) => (
                true,
                format!("no answer within {}", humantime::format_duration(n.timeout)),
            ),
        };
        tracing::warn!(target = %n.label, attempt, "webhook delivery failed: {error}");
        last_error = Some(error);
        if !retry {
            break;
        }
    }
    NotificationOutcome {
        target: n.label.clone(),
        ok: false,
        attempts,
        error: last_error,
        at_unix_ms: now_ms(),
    }
}

/// Sends every notification `run` calls for, one after the other.
pub async fn notify_all(
    gd: &GameDay,
    run: &GamedayRun,
    public_url: Option<&str>,
) -> Vec<NotificationOutcome> {
    let mut out = Vec::new();
    for n in gd.notify.iter().filter(|n| wanted(n, run)) {
        let body = match n.format {
            NotifyFormat::Json => summary_json(gd, run, public_url).to_string(),
            NotifyFormat::Slack => json!({ "text": slack_text(gd, run, public_url) }).to_string(),
        };
        out.push(deliver(n, Bytes::from(body)).await);
    }
    out
}

pub fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.round(jiff::Unit::Second).unwrap_or(t).to_string())
        .unwrap_or_default()
}

fn now_ms() -> i64 {
    gpuchaos_proto::clock::unix_ms() as i64
}
