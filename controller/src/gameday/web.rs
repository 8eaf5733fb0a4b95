//! The page `serve` offers: game days with their next slots, each objective's trend
//! as a chart ([`super::chart`]), recent runs with their verdicts and links to every
//! report; `/metrics` for Prometheus; `/api/status` as JSON; `/runs/ID/...` serves a
//! run's folder.
//!
//! Status marks are text glyphs every Debian has a font for (DejaVu: ✓ U+2713,
//! ✗ U+2717, ⚠ U+26A0, ○ U+25CB), never emoji: a headless browser or a server
//! without an emoji font would draw boxes.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Live;
use super::chart;
use super::history::{GamedayRun, GamedayVerdict, Store};
use super::notify::rfc3339;
use crate::report::escape;

/// How many runs the page lists.
const RECENT: usize = 30;

pub struct Web {
    pub live: Arc<Live>,
    pub store: Arc<Mutex<Store>>,
    /// `STATE/runs`.
    pub runs_dir: PathBuf,
}

/// Serves until `stop`.
pub async fn serve(listener: TcpListener, web: Arc<Web>, stop: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!("page: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let web = web.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let web = web.clone();
                async move { Ok::<_, Infallible>(route(&web, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(status: StatusCode, ctype: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", ctype)
        .header("cache-control", "no-store")
        .body(Full::new(body.into()))
        .expect("static response parts")
}

async fn route(web: &Arc<Web>, req: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/" => {
            let (runs, pending) = recent(web).await;
            let trends = trend_runs(web).await;
            reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                page(&web.live, &runs, &trends, pending, Timestamp::now()),
            )
        }
        "/metrics" => {
            let runs_dir = web.runs_dir.clone();
            let pending =
                tokio::task::spawn_blocking(move || super::history::pending_count(&runs_dir))
                    .await
                    .unwrap_or(0);
            reply(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                web.live.metrics_text(pending),
            )
        }
        "/api/status" => {
            let (runs, pending) = recent(web).await;
            reply(
                StatusCode::OK,
                "application/json",
                status_json(&web.live, &runs, pending).to_string(),
            )
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n"),
        p if p.starts_with("/runs/") => run_file(web, &p["/runs/".len()..]).await,
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// Recent runs from the history (off the runtime: a locked database waits).
async fn recent(web: &Arc<Web>) -> (Result<Vec<GamedayRun>, String>, usize) {
    let store = web.store.clone();
    tokio::task::spawn_blocking(move || {
        let s = store.lock().unwrap();
        (
            s.list(None, RECENT).map_err(|e| e.message),
            s.pending_count(),
        )
    })
    .await
    .unwrap_or_else(|e| (Err(e.to_string()), 0))
}

/// Per configured game day: its latest runs that ran (newest first) and how many
/// it has in all, or why the history could not say.
pub type TrendRuns = Vec<(String, Result<(Vec<GamedayRun>, usize), String>)>;

/// The runs the trend charts draw (off the runtime, as [`recent`]).
async fn trend_runs(web: &Arc<Web>) -> TrendRuns {
    let store = web.store.clone();
    let names: Vec<String> = web.live.gamedays.iter().map(|g| g.name.clone()).collect();
    tokio::task::spawn_blocking(move || {
        let s = store.lock().unwrap();
        names
            .into_iter()
            .map(|n| {
                let r = s.ran_runs(&n, chart::MAX_RUNS).map_err(|e| e.message);
                (n, r)
            })
            .collect()
    })
    .await
    .unwrap_or_default()
}

fn verdict_class(v: &GamedayVerdict) -> &'static str {
    use GamedayVerdict as V;
    match v {
        V::Passed => "v-ok",
        V::Failed | V::RevertFailed | V::Error | V::Aborted | V::InjectFailed | V::Interrupted => {
            "v-fail"
        }
        V::Running => "v-run",
        V::Missed | V::Skipped | V::NotRun | V::Other(_) => "v-warn",
    }
}

fn local(gd_tz: &jiff::tz::TimeZone, ms: i64) -> String {
    Timestamp::from_millisecond(ms)
        .map(|t| {
            t.to_zoned(gd_tz.clone())
                .strftime("%Y-%m-%d %H:%M:%S %Z")
                .to_string()
        })
        .unwrap_or_default()
}

/// The page: rendered whole on each request; refreshes itself every 30 s.
pub fn page(
    live: &Live,
    runs: &Result<Vec<GamedayRun>, String>,
    trends: &TrendRuns,
    pending: usize,
    now: Timestamp,
) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"refresh\" content=\"30\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>gpuchaos game days</title>\n<style>{}\
         .v-run{{background:#eff6ff;border-color:#2563eb}}td.v-ok,td.v-fail,td.v-warn,td.v-run{{font-weight:600}}\
         td.v-ok{{color:#15803d}}td.v-fail{{color:#b91c1c}}td.v-warn{{color:#b45309}}td.v-run{{color:#1d4ed8}}\
         .err{{background:#fef2f2;border:2px solid #dc2626;padding:8px 16px;border-radius:6px}}{}</style>\n</head>\n<body>\n",
        crate::report::CSS,
        chart::CSS
    );
    let _ = writeln!(
        h,
        "<h1>gpuchaos game days</h1>\n<p>gpuchaos {} · serving since {} · page generated {}</p>",
        env!("CARGO_PKG_VERSION"),
        rfc3339(live.started.as_millisecond()),
        rfc3339(now.as_millisecond())
    );
    if let Some(e) = live.history_error.lock().unwrap().as_ref() {
        let _ = writeln!(
            h,
            "<div class=\"err\" id=\"history-error\"><b>History:</b> {}</div>",
            escape(e)
        );
    }
    if pending > 0 {
        let _ = writeln!(
            h,
            "<div class=\"err\" id=\"pending\"><b>{pending} run result{} wait{} to be added to the history database</b> (kept safely in the state directory).</div>",
            if pending == 1 { "" } else { "s" },
            if pending == 1 { "s" } else { "" }
        );
    }
    h.push_str("<h2>Schedules</h2>\n<table id=\"schedules\">\n<tr><th>game day</th><th>schedule</th><th>next runs</th><th>max duration</th><th>blackouts</th><th>experiments</th><th>state</th></tr>\n");
    let next = live.next.lock().unwrap().clone();
    let running = live.running.lock().unwrap().clone();
    for gd in &live.gamedays {
        let s = &gd.schedule;
        let mut nexts = Vec::new();
        let mut t = next.get(&gd.name).copied().flatten();
        while let Some(n) = t {
            if nexts.len() == 3 {
                break;
            }
            nexts.push(format!(
                "<time datetime=\"{}\">{}</time>",
                n,
                escape(&s.local(n))
            ));
            t = s.next_after(n);
        }
        let blackouts: Vec<String> = gd
            .blackouts
            .iter()
            .map(|b| escape(&b.describe(s)))
            .collect();
        let exps: Vec<String> = gd
            .experiments
            .iter()
            .map(|p| {
                escape(
                    &p.file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                )
            })
            .collect();
        let state = match running.get(&gd.name) {
            Some(r) => format!(
                "<td class=\"v-run\">running <a href=\"/runs/{id}/\">{id}</a> since {}</td>",
                escape(&local(&s.tz, r.started_unix_ms)),
                id = escape(&r.id)
            ),
            None => "<td>idle</td>".into(),
        };
        let _ = writeln!(
            h,
            "<tr data-gameday=\"{name}\"><td><b>{name}</b>{desc}</td><td><code>{}</code> {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>{state}</tr>",
            escape(&s.cron_text),
            escape(&s.tz_name),
            if nexts.is_empty() {
                "none".into()
            } else {
                nexts.join("<br>")
            },
            humantime::format_duration(gd.max_duration),
            if blackouts.is_empty() {
                "-".into()
            } else {
                blackouts.join("<br>")
            },
            exps.join(", "),
            name = escape(&gd.name),
            desc = if gd.description.is_empty() {
                String::new()
            } else {
                format!("<br>{}", escape(&gd.description))
            },
        );
    }
    h.push_str("</table>\n");
    trend_section(&mut h, live, trends);
    h.push_str("<h2>Recent runs</h2>\n");
    match runs {
        Err(e) => {
            let _ = writeln!(
                h,
                "<div class=\"err\"><b>The history cannot be read:</b> {}</div>",
                escape(e)
            );
        }
        Ok(runs) if runs.is_empty() => h.push_str("<p id=\"no-runs\">No runs yet.</p>\n"),
        Ok(runs) => {
            h.push_str("<table id=\"runs\">\n<tr><th>run</th><th>game day</th><th>started</th><th>trigger</th><th>verdict</th><th>duration</th><th>experiments</th><th>reason</th></tr>\n");
            for r in runs {
                let tz = live
                    .gamedays
                    .iter()
                    .find(|g| g.name == r.gameday)
                    .map(|g| g.schedule.tz.clone())
                    .unwrap_or(jiff::tz::TimeZone::UTC);
                let exps: Vec<String> = r
                    .experiments
                    .iter()
                    .map(|e| {
                        let label = format!("{} {}", verdict_icon(&e.verdict), escape(&e.name));
                        match &e.report_dir {
                            Some(d) => format!(
                                "<a href=\"/runs/{}/{}/report.html\" title=\"{}\">{label}</a>",
                                escape(&r.id),
                                escape(d),
                                escape(e.verdict.as_str())
                            ),
                            None => {
                                format!(
                                    "<span title=\"{}\">{label}</span>",
                                    escape(e.verdict.as_str())
                                )
                            }
                        }
                    })
                    .collect();
                let duration = r
                    .ended_unix_ms
                    .filter(|_| r.ran())
                    .map(|e| {
                        crate::report::format_value((e - r.started_unix_ms) as f64 / 1000.0, "s")
                    })
                    .unwrap_or_else(|| "-".into());
                let _ = writeln!(
                    h,
                    "<tr data-run=\"{id}\"><td><a href=\"/runs/{id}/\">{id}</a></td><td>{}</td><td>{}</td><td>{}</td><td class=\"{} verdict\">{}</td><td>{duration}</td><td>{}</td><td>{}</td></tr>",
                    escape(&r.gameday),
                    escape(&local(&tz, r.started_unix_ms)),
                    escape(&r.trigger),
                    verdict_class(&r.verdict),
                    escape(r.verdict.as_str()),
                    exps.join(" · "),
                    escape(r.reason.as_deref().unwrap_or("")),
                    id = escape(&r.id),
                );
            }
            h.push_str("</table>\n");
        }
    }
    h.push_str("<p><a href=\"/metrics\">metrics</a> · <a href=\"/api/status\">status as JSON</a></p>\n</body>\n</html>\n");
    h
}

/// Each configured game day's objectives as charts.
fn trend_section(h: &mut String, live: &Live, trends: &TrendRuns) {
    h.push_str("<h2>Trends</h2>\n");
    for (g, (name, runs)) in trends.iter().enumerate() {
        let _ = writeln!(h, "<h3 data-trends=\"{0}\">{0}</h3>", escape(name));
        let (runs, total) = match runs {
            Err(e) => {
                let _ = writeln!(
                    h,
                    "<div class=\"err\"><b>The history cannot be read:</b> {}</div>",
                    escape(e)
                );
                continue;
            }
            Ok(r) => r,
        };
        let list = chart::trends(runs, *total);
        if list.is_empty() {
            h.push_str("<p>No measurements yet.</p>\n");
            continue;
        }
        let (tz, tz_name) = live
            .gamedays
            .iter()
            .find(|gd| &gd.name == name)
            .map(|gd| (gd.schedule.tz.clone(), gd.schedule.tz_name.clone()))
            .unwrap_or((jiff::tz::TimeZone::UTC, "UTC".into()));
        h.push_str(&chart::legend());
        h.push_str("<div class=\"trends\">\n");
        for (k, t) in list.iter().enumerate() {
            let _ = write!(
                h,
                "<section class=\"trend-box\"><h4>{}</h4>\n{}</section>\n",
                escape(&t.title()),
                chart::svg(t, &format!("trend-{g}-{k}"), &tz, &tz_name)
            );
        }
        h.push_str("</div>\n");
    }
}

fn verdict_icon(v: &GamedayVerdict) -> &'static str {
    match v {
        GamedayVerdict::Passed => "✓",
        GamedayVerdict::Failed => "✗",
        GamedayVerdict::NotRun => "○",
        _ => "⚠",
    }
}

pub fn status_json(
    live: &Live,
    runs: &Result<Vec<GamedayRun>, String>,
    pending: usize,
) -> serde_json::Value {
    let next = live.next.lock().unwrap().clone();
    let running = live.running.lock().unwrap().clone();
    json!({
        "gamedays": live.gamedays.iter().map(|g| json!({
            "name": g.name,
            "schedule": g.schedule.cron_text,
            "timezone": g.schedule.tz_name,
            "next": next.get(&g.name).copied().flatten().map(|t| t.to_string()),
            "running": running.get(&g.name).map(|r| r.id.clone()),
        })).collect::<Vec<_>>(),
        "runs": match runs { Ok(r) => json!(r), Err(e) => json!({"error": e}) },
        "history_pending": pending,
        "history_error": *live.history_error.lock().unwrap(),
    })
}

/// `/runs/ID/` (an index of the run) and `/runs/ID/PATH` (a file of its folder).
async fn run_file(web: &Arc<Web>, rest: &str) -> Response<Full<Bytes>> {
    let not_found = || reply(StatusCode::NOT_FOUND, "text/plain", "not found\n");
    let (id, file) = rest.split_once('/').unwrap_or((rest, ""));
    let rel = Path::new(file);
    if id.is_empty()
        || id.contains("..")
        || rel.components().any(|c| !matches!(c, Component::Normal(_)))
    {
        return not_found();
    }
    let dir: PathBuf = web.runs_dir.join(id);
    if !rest.contains('/')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        // `/runs/ID`: the page's links are relative to `/runs/ID/`.
        return Response::builder()
            .status(StatusCode::MOVED_PERMANENTLY)
            .header("location", format!("/runs/{id}/"))
            .body(Full::new(Bytes::new()))
            .expect("static response parts");
    }
    if file.is_empty() {
        let Ok(run) = super::history::read_summary(&dir) else {
            return not_found();
        };
        return reply(StatusCode::OK, "text/html; charset=utf-8", run_index(&run));
    }
    let path = dir.join(rel);
    match tokio::fs::read(&path).await {
        Ok(b) => {
            let ctype = match path.extension().and_then(|e| e.to_str()) {
                Some("html") => "text/html; charset=utf-8",
                Some("json") => "application/json",
                Some("xml") => "application/xml",
                Some("md") => "text/markdown; charset=utf-8",
                _ => "application/octet-stream",
            };
            reply(StatusCode::OK, ctype, b)
        }
        Err(_) => not_found(),
    }
}

/// A run's own page: its verdict and each experiment with links to its reports.
pub fn run_index(run: &GamedayRun) -> String {
    let mut h = format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>gpuchaos: {id}: {v}</title>\n<style>{css}</style>\n</head>\n<body>\n\
         <p><a href=\"/\">← game days</a></p>\n<header class=\"{class}\"><h1>{id}: {v}</h1>\n<p>game day {gd} · {trigger} · started {start}{exit}</p>\n",
        id = escape(&run.id),
        v = escape(run.verdict.as_str()),
        css = crate::report::CSS,
        class = match verdict_class(&run.verdict) {
            "v-run" => "v-warn",
            c => c,
        },
        gd = escape(&run.gameday),
        trigger = escape(&run.trigger),
        start = rfc3339(run.started_unix_ms),
        exit = run
            .exit_code
            .map(|c| format!(" · exit code <b>{c}</b>"))
            .unwrap_or_default(),
    );
    if let Some(r) = &run.reason {
        let _ = writeln!(h, "<p><b>reason:</b> {}</p>", escape(r));
    }
    let reports: Vec<String> = run
        .experiments
        .iter()
        .filter_map(|e| {
            e.report_dir.as_ref().map(|d| {
                format!(
                    "<a class=\"report\" href=\"/runs/{}/{}/report.html\">{} {}</a>",
                    escape(&run.id),
                    escape(d),
                    verdict_icon(&e.verdict),
                    escape(&e.name)
                )
            })
        })
        .collect();
    if !reports.is_empty() {
        let _ = writeln!(
            h,
            "<p id=\"reports\"><b>report{}:</b> {}</p>",
            if reports.len() == 1 { "" } else { "s" },
            reports.join(" · ")
        );
    }
    h.push_str("</header>\n<h2>Experiments</h2>\n<table>\n<tr><th>#</th><th>experiment</th><th>verdict</th><th>objectives</th><th>reports</th></tr>\n");
    for e in &run.experiments {
        let objectives: Vec<String> = e
            .objectives
            .iter()
            .map(|o| {
                format!(
                    "{} {}: {} (limit {})",
                    if o.passed { "✓" } else { "✗" },
                    escape(&o.name),
                    o.measured
                        .map(|v| crate::report::format_value(v, &o.unit))
                        .unwrap_or_else(|| "-".into()),
                    escape(&o.limit)
                )
            })
            .collect();
        let reports = match &e.report_dir {
            Some(d) => ["report.html", "summary.md", "junit.xml", "journal.json"]
                .iter()
                .map(|f| {
                    format!(
                        "<a href=\"/runs/{}/{}/{f}\">{f}</a>",
                        escape(&run.id),
                        escape(d)
                    )
                })
                .collect::<Vec<_>>()
                .join(" · "),
            None => "-".into(),
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td class=\"{}\">{}{}</td><td>{}</td><td>{reports}</td></tr>",
            e.seq,
            escape(&e.name),
            verdict_class(&e.verdict),
            escape(e.verdict.as_str()),
            e.reason
                .as_ref()
                .map(|r| format!("<br><small>{}</small>", escape(r)))
                .unwrap_or_default(),
            objectives.join("<br>"),
        );
    }
    h.push_str("</table>\n");
    if !run.notifications.is_empty() {
        h.push_str("<h2>Notifications</h2>\n<ul>\n");
        for n in &run.notifications {
            let _ = writeln!(
                h,
                "<li>{}: {} after {} attempt{}{}</li>",
                escape(&n.target),
                if n.ok { "delivered" } else { "FAILED" },
                n.attempts,
                if n.attempts == 1 { "" } else { "s" },
                n.error
                    .as_ref()
                    .map(|e| format!(" ({})", escape(e)))
                    .unwrap_or_default()
            );
        }
        h.push_str("</ul>\n");
    }
    h.push_str("</body>\n</html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::super::history::{ExperimentOutcome, ObjectiveOutcome};
    use super::*;

    fn run(id: &str, started: i64, measured: f64, name: &str) -> GamedayRun {
        let passed = measured <= 10.0;
        let verdict = if passed {
            GamedayVerdict::Passed
        } else {
            GamedayVerdict::Failed
        };
        GamedayRun {
            id: id.into(),
            gameday: "nightly".into(),
            started_unix_ms: started,
            verdict: verdict.clone(),
            experiments: vec![ExperimentOutcome {
                seq: 1,
                name: "pause-target".into(),
                verdict,
                report_dir: Some("01-pause-target".into()),
                objectives: vec![ObjectiveOutcome {
                    name: name.into(),
                    kind: "rto".into(),
                    unit: "s".into(),
                    measured: Some(measured),
                    limit: "≤ 10s".into(),
                    passed,
                }],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn the_page_draws_a_chart_per_objective_with_names_escaped_and_no_emoji() {
        let live = Live::new(vec![], Timestamp::UNIX_EPOCH);
        let name = "<script>alert(1)</script>";
        let runs = vec![
            run("nightly-2", 2_000, 12.0, name),
            run("nightly-1", 1_000, 2.0, name),
        ];
        let trends: TrendRuns = vec![("nightly".into(), Ok((runs.clone(), 2)))];
        let page = page(&live, &Ok(runs), &trends, 0, Timestamp::UNIX_EPOCH);
        assert!(page.contains("<h2>Trends</h2>"));
        assert_eq!(page.matches("class=\"trend\"").count(), 1, "{page}");
        assert_eq!(page.matches("class=\"pt fail\" data-run-id").count(), 1);
        assert_eq!(page.matches("class=\"pt ok\" data-run-id").count(), 1);
        assert!(!page.contains("<script"), "{page}");
        assert!(page.contains("<h4>pause-target · &lt;script&gt;alert(1)&lt;/script&gt;</h4>"));
        assert!(page.contains("✗ pause-target</a>"), "{page}");
        assert!(
            !page
                .chars()
                .any(|c| matches!(c as u32, 0x1f000..|0xfe0f| 0x2705 | 0x274c))
        );
    }

    #[test]
    fn a_history_with_no_measurement_says_so() {
        let live = Live::new(vec![], Timestamp::UNIX_EPOCH);
        let trends: TrendRuns = vec![
            ("a".into(), Ok((vec![], 0))),
            ("b".into(), Err("locked".into())),
        ];
        let page = page(&live, &Ok(vec![]), &trends, 0, Timestamp::UNIX_EPOCH);
        assert!(page.contains("<h3 data-trends=\"a\">a</h3>\n<p>No measurements yet.</p>"));
        assert!(page.contains("<b>The history cannot be read:</b> locked"));
    }

    #[test]
    fn the_run_page_links_its_reports_from_the_site_root() {
        let page = run_index(&run("nightly-1", 1_000, 2.0, "rto"));
        assert!(page.contains(
            "<p id=\"reports\"><b>report:</b> <a class=\"report\" href=\"/runs/nightly-1/01-pause-target/report.html\">✓ pause-target</a></p>"
        ), "{page}");
        assert!(page.contains("<a href=\"/runs/nightly-1/01-pause-target/journal.json\">"));
        assert!(page.contains("✓ rto: 2.000s (limit ≤ 10s)"));
    }
}
