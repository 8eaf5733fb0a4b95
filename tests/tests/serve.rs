//! `gpuchaos serve` end to end: real agent, real target, real CLI, the schedule's
//! clock set with `GPUCHAOS_CLOCK` so that a slot comes up within seconds.
//!
//! - a scheduled run is recorded, notified (JSON and Slack text to a webhook
//!   receiver started here), shown on the page (checked in headless Chromium) and
//!   in /metrics; the history survives a restart; `report` regenerates the reports;
//!   slots missed while serve was down are recorded as documented;
//! - a damaged history database gives a clear error and is rebuilt from the run
//!   folders; a locked one keeps the result pending until it is free;
//! - SIGTERM during a run reverts its fault and records it as aborted;
//! - two controllers with the same game day: one runs it, the other records why not.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gpuchaos_tests::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// An experiment pausing the target for `pause`, with an RTO objective.
fn experiment(dir: &Path, agent: &Agent, target: &Target, pause: &str) -> PathBuf {
    let objectives =
        "objectives:\n  - name: recovery\n    rto: {probe: health, limit: 10s, consecutive: 3}\n";
    write(
        dir,
        "pause.yaml",
        &pause_experiment(agent, target, pause, objectives),
    )
}

/// A webhook receiver: answers 200 to every POST and keeps (path, body).
struct Receiver {
    url: String,
    got: Arc<Mutex<Vec<(String, String)>>>,
}

impl Receiver {
    fn start() -> Receiver {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", l.local_addr().unwrap());
        let got = Arc::new(Mutex::new(Vec::new()));
        let g = got.clone();
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let mut r = BufReader::new(s);
                let mut line = String::new();
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).is_err() || h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                }
                let mut body = vec![0; len];
                let _ = r.read_exact(&mut body);
                g.lock()
                    .unwrap()
                    .push((path, String::from_utf8_lossy(&body).into_owned()));
                let _ = r.get_mut().write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                );
            }
        });
        Receiver { url, got }
    }

    fn wait_for(&self, n: usize, timeout: Duration) -> Vec<(String, String)> {
        wait_until(timeout, || self.got.lock().unwrap().len() >= n);
        self.got.lock().unwrap().clone()
    }
}

/// `gpuchaos serve` as a child, its page address read from its first line.
struct Serve {
    child: Child,
    url: String,
}

impl Serve {
    fn start(gameday: &Path, state: &Path, clock: &str) -> Serve {
        let mut child = Command::new(bin("gpuchaos"))
            .args([
                "serve",
                "--gameday",
                gameday.to_str().unwrap(),
                "--state-dir",
                state.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .env("GPUCHAOS_CLOCK", clock)
            .env("GPUCHAOS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn gpuchaos serve");
        let mut first = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut first)
            .unwrap();
        let url = first
            .split("page ")
            .nth(1)
            .and_then(|r| r.split('/').nth(2))
            .map(|hostport| format!("http://{hostport}"))
            .unwrap_or_else(|| panic!("no page address in {first:?}"));
        Serve { child, url }
    }

    /// SIGTERM, then the exit code and stderr.
    fn stop(mut self) -> (i32, String) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let mut err = String::new();
        let _ = self.child.stderr.take().unwrap().read_to_string(&mut err);
        let code = self.child.wait().unwrap().code().unwrap_or(-1);
        (code, err)
    }

    fn get(&self, path: &str) -> String {
        http_get(&format!("{}{path}", self.url))
    }

    fn status(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/api/status")).unwrap()
    }
}

fn http_get(url: &str) -> String {
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest.split_once('/').unwrap();
    let mut s = TcpStream::connect(host).unwrap();
    write!(
        s,
        "GET /{path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}

fn history(state: &Path) -> (CliOut, serde_json::Value) {
    let out = gpuchaos(&[
        "--output",
        "json",
        "history",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let v = serde_json::from_str(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, v)
}

fn run_verdicts(h: &serde_json::Value) -> Vec<(String, String)> {
    h["runs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["id"].as_str().unwrap().to_string(),
                        r["verdict"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Headless Debian Chromium's rendering of `url` (the DOM after scripts ran).
fn chromium_dom(url: &str) -> String {
    String::from_utf8_lossy(&chromium(&["--dump-dom", url]).stdout).into_owned()
}

fn gameday_file(dir: &Path, exp: &Path, hooks: &str, extra: &str) -> PathBuf {
    write(
        dir,
        "nightly.yaml",
        &format!(
            "name: nightly\ndescription: pause the target, expect recovery\nschedule: {{cron: \"0 14 * * *\", timezone: Europe/Berlin}}\nexperiments: [{}]\nmax_duration: 2m\nstart_deadline: 10s\n{hooks}{extra}",
            exp.file_name().unwrap().to_str().unwrap()
        ),
    )
}

#[test]
fn a_scheduled_game_day_is_run_recorded_notified_shown_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("agent"));
    let target = Target::spawn();
    let exp = experiment(dir.path(), &agent, &target, "1s");
    let hook = Receiver::start();
    // 14:00 in Berlin is 13:00 UTC in November.
    let gd = gameday_file(
        dir.path(),
        &exp,
        &format!(
            "notify:\n  - {{webhook: \"{u}/json\"}}\n  - {{webhook: \"{u}/slack\", format: slack}}\n",
            u = hook.url
        ),
        "",
    );
    assert_eq!(gpuchaos(&["validate", gd.to_str().unwrap()]).code, 0);
    let state = dir.path().join("state");
    let serve = Serve::start(&gd, &state, "2026-11-25T12:59:57Z");
    let st = serve.status();
    assert_eq!(st["gamedays"][0]["next"], "2026-11-25T13:00:00Z", "{st}");

    // The slot comes 3 s later; the run takes a few seconds; then both webhooks.
    let got = hook.wait_for(2, Duration::from_secs(60));
    assert_eq!(got.len(), 2, "webhooks: {got:?}");
    let json_hook: serde_json::Value =
        serde_json::from_str(&got.iter().find(|(p, _)| p == "/json").unwrap().1).unwrap();
    assert_eq!(json_hook["gameday"], "nightly");
    assert_eq!(json_hook["run"], "nightly-20261125T130000Z");
    assert_eq!(json_hook["trigger"], "schedule");
    assert_eq!(json_hook["verdict"], "passed", "{json_hook}");
    assert_eq!(json_hook["slot"], "2026-11-25T13:00:00Z");
    let obj = &json_hook["experiments"][0]["objectives"][0];
    assert_eq!(obj["name"], "recovery");
    let rto = obj["measured"].as_f64().unwrap();
    assert!(rto > 0.9 && rto < 5.0, "measured RTO {rto}");
    assert!(
        json_hook["experiments"][0]["report"]
            .as_str()
            .unwrap()
            .ends_with("/runs/nightly-20261125T130000Z/01-pause-target/report.html"),
        "{json_hook}"
    );
    let slack: serde_json::Value =
        serde_json::from_str(&got.iter().find(|(p, _)| p == "/slack").unwrap().1).unwrap();
    let text = slack["text"].as_str().unwrap();
    assert!(
        text.starts_with(
            ":white_check_mark: Game day *nightly* passed (exit 0): 1/1 experiments passed"
        ),
        "{text}"
    );
    assert!(!is_stopped(target.pid));

    // The page, as a real browser renders it: the schedule and the last run.
    let dom = chromium_dom(&format!("{}/", serve.url));
    assert!(dom.contains("<h1>gpuchaos game days</h1>"), "{dom}");
    assert!(dom.contains("data-gameday=\"nightly\""), "{dom}");
    assert!(dom.contains("0 14 * * *</code> Europe/Berlin"), "{dom}");
    assert!(
        dom.contains("2026-11-26 14:00 CET"),
        "next slot missing: {dom}"
    );
    let row_start = dom
        .find("data-run=\"nightly-20261125T130000Z\"")
        .expect("the run's row");
    let row = &dom[row_start..dom[row_start..].find("</tr>").unwrap() + row_start];
    assert!(row.contains("class=\"v-ok verdict\">passed<"), "{row}");
    assert!(
        row.contains("/runs/nightly-20261125T130000Z/01-pause-target/report.html"),
        "{row}"
    );
    // The linked report is there.
    let report = serve.get("/runs/nightly-20261125T130000Z/01-pause-target/report.html");
    assert!(report.contains("pause-target: passed"), "{report}");
    assert_eq!(
        serve.get("/runs/nightly-20261125T130000Z/../../history.db"),
        "not found\n"
    );

    let metrics = serve.get("/metrics");
    for want in [
        "gpuchaos_gameday_runs_total{gameday=\"nightly\",verdict=\"passed\"} 1",
        "gpuchaos_gameday_last_run_passed{gameday=\"nightly\"} 1",
        "gpuchaos_gameday_running{gameday=\"nightly\"} 0",
        "gpuchaos_gameday_next_run_timestamp_seconds{gameday=\"nightly\"} 1795698000",
        "gpuchaos_gameday_notifications_total{gameday=\"nightly\",result=\"ok\"} 2",
        "gpuchaos_gameday_history_pending_runs 0",
    ] {
        assert!(metrics.contains(want), "missing {want} in\n{metrics}");
    }
    assert!(
        metrics.contains("gpuchaos_gameday_objective_measured{gameday=\"nightly\",experiment=\"pause-target\",objective=\"recovery\",kind=\"rto\",unit=\"s\"}"),
        "{metrics}"
    );
    let (code, err) = serve.stop();
    assert_eq!(code, 0, "{err}");

    // History survives: a new process reads it back.
    let (out, h) = history(&state);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        run_verdicts(&h),
        [("nightly-20261125T130000Z".to_string(), "passed".to_string())]
    );
    assert_eq!(h["pass_rates"][0]["passed"], 1);
    let trend = &h["trends"][0];
    assert_eq!(
        (
            trend["objective"].as_str(),
            trend["points"].as_array().unwrap().len()
        ),
        (Some("recovery"), 1)
    );
    let text = gpuchaos(&["history", "--state-dir", state.to_str().unwrap()]);
    assert!(
        text.stdout.contains("nightly: 1/1 runs passed (100%)"),
        "{}",
        text.stdout
    );
    assert!(
        text.stdout
            .contains("nightly / pause-target / recovery (rto)"),
        "{}",
        text.stdout
    );

    // report regenerates from the stored journal, even with the folder gone.
    let run_dir = state.join("runs").join("nightly-20261125T130000Z");
    std::fs::remove_dir_all(run_dir.join("01-pause-target")).unwrap();
    let out_dir = dir.path().join("regenerated");
    let r = gpuchaos(&[
        "report",
        "last",
        "--state-dir",
        state.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    let html = std::fs::read_to_string(out_dir.join("01-pause-target/report.html")).unwrap();
    assert!(html.contains("pause-target: passed"));
    assert!(out_dir.join("01-pause-target/junit.xml").exists());
    let missing = gpuchaos(&["report", "nosuch", "--state-dir", state.to_str().unwrap()]);
    assert_eq!(missing.code, 64);
    assert!(
        missing.stderr.contains("no run `nosuch` in the history"),
        "{}",
        missing.stderr
    );

    // Down for two days: back at 13:00:30 UTC on the 27th, 30 s after the slot but
    // past the 10 s start deadline: both slots recorded as missed, none run.
    let serve = Serve::start(&gd, &state, "2026-11-27T13:00:30Z");
    wait_until(Duration::from_secs(10), || {
        history(&state).1["runs"]
            .as_array()
            .is_some_and(|a| a.len() == 2)
    });
    let (code, err) = serve.stop();
    assert_eq!(code, 0, "{err}");
    let (_, h) = history(&state);
    let runs = h["runs"].as_array().unwrap();
    assert_eq!(runs[0]["verdict"], "missed", "{h}");
    assert_eq!(runs[0]["missed_slots"], 2);
    assert_eq!(runs[0]["id"], "nightly-20261127T130000Z");
    let reason = runs[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("2 slots from 2026-11-26 14:00 CET to 2026-11-27 14:00 CET passed while no gpuchaos serve was running; the latest is 30s old, past the start_deadline of 10s"),
        "{reason}"
    );
    assert_eq!(
        hook.wait_for(4, Duration::from_secs(10)).len(),
        4,
        "the missed slots are notified too"
    );
    assert_eq!(h["pass_rates"][0]["missed"], 2);

    // A damaged database: a clear error, exit 74; rebuilt from the run folders.
    let db = state.join("history.db");
    for f in ["history.db-wal", "history.db-shm"] {
        let _ = std::fs::remove_file(state.join(f));
    }
    std::fs::write(&db, vec![0x42u8; 16384]).unwrap();
    let (out, _) = history(&state);
    assert_eq!(out.code, 74, "{}", out.stderr);
    assert!(
        out.stderr.contains("is damaged") && out.stderr.contains("history --rebuild"),
        "{}",
        out.stderr
    );
    let serve_out = gpuchaos(&[
        "serve",
        "--gameday",
        gd.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--listen",
        "127.0.0.1:0",
    ]);
    assert_eq!(serve_out.code, 74, "{}", serve_out.stderr);
    std::fs::rename(&db, state.join("history.db.damaged")).unwrap();
    let rebuilt = gpuchaos(&[
        "history",
        "--rebuild",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert_eq!(rebuilt.code, 0, "{}", rebuilt.stderr);
    assert!(
        rebuilt.stdout.contains("indexed 2 runs"),
        "{}",
        rebuilt.stdout
    );
    let (_, h) = history(&state);
    assert_eq!(run_verdicts(&h).len(), 2);
    drop(agent);
}

#[test]
fn a_locked_history_keeps_the_result_until_it_is_free() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("agent"));
    let target = Target::spawn();
    let exp = experiment(dir.path(), &agent, &target, "500ms");
    let gd = gameday_file(dir.path(), &exp, "", "");
    let state = dir.path().join("state");
    let serve = Serve::start(&gd, &state, "2026-11-25T12:59:58Z");
    // Another process holds the database's write lock for the whole run.
    let mut locker = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys\nc=sqlite3.connect(sys.argv[1],isolation_level=None)\nc.execute('BEGIN EXCLUSIVE')\nprint('locked',flush=True)\nsys.stdin.read()\n",
            state.join("history.db").to_str().unwrap(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    BufReader::new(locker.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "locked");
    // The run happens and ends; its result waits in its folder.
    let done = wait_until(Duration::from_secs(60), || {
        history::read(&state.join("runs").join("nightly-20261125T130000Z"))
            .is_some_and(|v| v["verdict"] == "passed")
    });
    assert!(done.is_some(), "the run did not end");
    wait_until(Duration::from_secs(15), || {
        serve.status()["history_error"]
            .as_str()
            .is_some_and(|e| e.contains("locked"))
    });
    let st = serve.status();
    assert_eq!(st["history_pending"], 1, "{st}");
    assert!(
        st["history_error"]
            .as_str()
            .unwrap()
            .contains("is locked by another process"),
        "{st}"
    );
    let page = serve.get("/");
    assert!(
        page.contains("1 run result waits to be added to the history database"),
        "{page}"
    );
    // Released: the next look at the history adds it.
    drop(locker.stdin.take());
    let _ = locker.wait();
    let (out, h) = history(&state);
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        run_verdicts(&h),
        [("nightly-20261125T130000Z".to_string(), "passed".to_string())]
    );
    assert_eq!(h["history_pending"], 0);
    let (code, err) = serve.stop();
    assert_eq!(code, 0, "{err}");
    drop(agent);
}

#[test]
fn stopping_serve_during_a_run_reverts_it_and_records_it() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("agent"));
    let target = Target::spawn();
    let exp = experiment(dir.path(), &agent, &target, "60s");
    let gd = gameday_file(dir.path(), &exp, "", "");
    let state = dir.path().join("state");
    let serve = Serve::start(&gd, &state, "2026-11-25T12:59:58Z");
    assert!(
        wait_until(Duration::from_secs(30), || is_stopped(target.pid)).is_some(),
        "the game day never paused the target"
    );
    let page = serve.get("/");
    assert!(
        page.contains("running <a href=\"/runs/nightly-20261125T130000Z/\">"),
        "{page}"
    );
    let t0 = std::time::Instant::now();
    let (code, err) = serve.stop();
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("interrupting nightly-20261125T130000Z"),
        "{err}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(20),
        "stopping took {:?}",
        t0.elapsed()
    );
    assert!(
        !is_stopped(target.pid),
        "the target is still paused after serve stopped"
    );
    let (_, h) = history(&state);
    let run = &h["runs"][0];
    assert_eq!(run["verdict"], "aborted", "{h}");
    assert_eq!(run["exit_code"], 2);
    assert!(
        run["reason"]
            .as_str()
            .unwrap()
            .contains("gpuchaos serve is stopping"),
        "{run}"
    );
    drop(agent);
}

#[test]
fn two_controllers_never_run_the_same_game_day_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("agent"));
    let target = Target::spawn();
    // Long enough that the second controller, started a moment later, reaches the
    // slot while the first still runs.
    let exp = experiment(dir.path(), &agent, &target, "8s");
    let gd = gameday_file(dir.path(), &exp, "", "");
    // Two controllers, two machines' worth of state, one agent.
    let (sa, sb) = (dir.path().join("a"), dir.path().join("b"));
    let a = Serve::start(&gd, &sa, "2026-11-25T12:59:58Z");
    let b = Serve::start(&gd, &sb, "2026-11-25T12:59:58Z");
    let both = || {
        let va = run_verdicts(&history(&sa).1);
        let vb = run_verdicts(&history(&sb).1);
        (va, vb)
    };
    let ended = |v: &[(String, String)]| v.first().is_some_and(|(_, x)| x != "running");
    wait_until(Duration::from_secs(60), || {
        let (va, vb) = both();
        ended(&va) && ended(&vb)
    });
    let (va, vb) = both();
    let mut verdicts = vec![va[0].1.clone(), vb[0].1.clone()];
    verdicts.sort();
    assert_eq!(verdicts, ["passed", "skipped"], "a: {va:?} b: {vb:?}");
    let skipped_state = if va[0].1 == "skipped" { &sa } else { &sb };
    let h = history(skipped_state).1;
    let reason = h["runs"][0]["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("game day nightly is already running from another controller")
            && reason.contains("lock `gameday:nightly` is held"),
        "{reason}"
    );
    assert_eq!(a.stop().0, 0);
    assert_eq!(b.stop().0, 0);
    drop(agent);
}

mod history {
    use std::path::Path;

    /// A run folder's summary, if written.
    pub fn read(dir: &Path) -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join("run.json")).ok()?).ok()
    }
}
