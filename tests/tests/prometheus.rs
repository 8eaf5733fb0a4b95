//! Stop conditions and probes against a real Prometheus server (Debian's
//! `prometheus` package, installed by scripts/test.sh), scraping a real agent.
//!
//! - a stop condition with a PromQL syntax error: the run does not start (exit 2,
//!   nothing injected) and says what Prometheus said;
//! - a stop condition on the agent's own metrics fires mid-run and the fault is
//!   reverted;
//! - probe failures say what Prometheus returned.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gpuchaos_tests::*;

struct Prometheus {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn get(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    use std::io::Write;
    write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

impl Prometheus {
    /// Scrapes `target` (HOST:PORT) every second.
    fn start(target: &str) -> Prometheus {
        let bin = ["/usr/bin/prometheus", "/usr/local/bin/prometheus"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect(
                "prometheus is not installed: scripts/test.sh installs Debian's prometheus package",
            );
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: agent\n    static_configs: [{{targets: ['{target}']}}]\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("log")).unwrap(),
            ))
            .spawn()
            .expect("start prometheus");
        let url = format!("http://127.0.0.1:{port}");
        let p = Prometheus {
            child,
            url,
            _dir: dir,
        };
        // Ready, and the agent scraped at least once.
        let q = format!("{}/api/v1/query?query=up", p.url);
        wait_until(Duration::from_secs(30), || {
            get(&q).is_some_and(|b| b.contains("\"value\"") && b.contains("\"1\""))
        })
        .expect("prometheus never scraped the agent");
        p
    }
}

fn run_file(dir: &Path, yaml: &str) -> (CliOut, serde_json::Value) {
    let file = spec_file(dir, "exp.yaml", yaml);
    let reports = dir.join("reports");
    let out = gpuchaos(&[
        "run",
        file.to_str().unwrap(),
        "--report-dir",
        reports.to_str().unwrap(),
    ]);
    let j = std::fs::read_to_string(reports.join("journal.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    (out, j)
}

#[tokio::test]
async fn a_broken_stop_condition_stops_the_run_before_anything_is_injected() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("state"));
    let target = Target::spawn();
    let prom = Prometheus::start(&agent.metrics);
    let exp = pause_experiment(
        &agent,
        &target,
        "5s",
        &format!(
            "stop_conditions:\n  - {{name: errors, prometheus: {{url: '{}', query: 'sum(rate(errors[1m]) >', op: '>', value: 0.5}}, interval: 1s}}\n",
            prom.url
        ),
    );
    let (out, j) = run_file(dir.path(), &exp);
    assert_eq!(out.code, 2, "{out:?}");
    let reason = j["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.starts_with("nothing was injected: stop condition errors cannot be evaluated: prometheus answered 400 (bad_data)"), "{reason}");
    assert!(reason.contains("parse error"), "{reason}");
    assert!(
        out.stdout.contains("aborted") || out.stderr.contains("aborted"),
        "{out:?}"
    );
    // Nothing was injected, ever.
    let mut c = agent.client().await;
    assert!(faults(&mut c, true).await.is_empty());
    assert!(!is_stopped(target.pid));

    // A probe with the same error is refused the same way.
    let exp = pause_experiment(&agent, &target, "5s", "")
        .replace(
            "steady_state:",
            &format!(
                "  - name: prom\n    interval: 500ms\n    prometheus: {{url: '{}', query: 'up ==', op: '==', value: 1}}\nsteady_state:",
                prom.url
            ),
        );
    let (out, j) = run_file(dir.path(), &exp);
    assert_eq!(out.code, 2, "{out:?}");
    assert!(
        j["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("probe prom cannot be evaluated: prometheus answered 400"),
        "{j}"
    );
    assert!(faults(&mut c, true).await.is_empty());
}

#[tokio::test]
async fn a_stop_condition_on_the_agents_metrics_fires_through_prometheus() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("state"));
    let target = Target::spawn();
    let prom = Prometheus::start(&agent.metrics);
    // The agent's own gauge of active faults, scraped every second: the stop
    // condition fires once Prometheus sees the pause.
    let exp = format!(
        r#"
metadata: {{name: prom-stop}}
agents: [{{name: a, address: "{grpc}"}}]
lease: 2s
probes:
  - name: prom-empty
    interval: 500ms
    prometheus: {{url: '{u}', query: 'no_such_metric', op: '<', value: 1}}
  - name: prom-value
    interval: 500ms
    prometheus: {{url: '{u}', query: 'sum(gpuchaos_agent_sessions)', op: '>', value: 5}}
method:
  - name: pause
    fault: {{kind: process, duration: 30s, action: pause, target: {{cmdline: "{re}"}}}}
stop_conditions:
  - {{name: a fault is active, prometheus: {{url: '{u}', query: 'sum(gpuchaos_agent_active_faults)', op: '>', value: 0}}, interval: 1s}}
"#,
        grpc = agent.grpc,
        u = prom.url,
        re = target.cmdline_regex()
    );
    let t = std::time::Instant::now();
    let (out, j) = run_file(dir.path(), &exp);
    assert_eq!(out.code, 2, "{out:?}\n{exp}");
    assert!(
        j["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("stop condition: a fault is active"),
        "{j}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "fired after {:?}",
        t.elapsed()
    );
    assert!(!is_stopped(target.pid), "the fault was reverted");
    let mut c = agent.client().await;
    assert!(faults(&mut c, false).await.is_empty());
    // Probe failures say what Prometheus returned.
    let errors: Vec<String> = j["samples"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["error"].as_str().map(str::to_string))
        .collect();
    assert!(
        errors
            .iter()
            .any(|e| e == "no_such_metric < 1 does not hold: the vector was empty"),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("sum(gpuchaos_agent_sessions) > 5 does not hold: value ")),
        "{errors:?}"
    );
}

#[tokio::test]
async fn a_stop_condition_that_stops_answering_mid_run_aborts_it() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("state"));
    let target = Target::spawn();
    let mut prom = Prometheus::start(&agent.metrics);
    let exp = pause_experiment(
        &agent,
        &target,
        "60s",
        &format!(
            "stop_conditions:\n  - {{name: runaway, prometheus: {{url: '{}', query: 'sum(gpuchaos_agent_active_faults)', op: '>', value: 100}}, interval: 500ms}}\n",
            prom.url
        ),
    );
    // Prometheus goes away 3 s into the run: within about 3 intervals (1.5 s) of
    // failed evaluations the run is aborted instead of running unprotected.
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(3));
        let _ = prom.child.kill();
        let _ = prom.child.wait();
        prom
    });
    let t = std::time::Instant::now();
    let (out, j) = run_file(dir.path(), &exp);
    let _prom = killer.join().unwrap();
    assert_eq!(out.code, 2, "{out:?}");
    let reason = j["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("stop condition runaway could not be evaluated for")
            && reason.contains("unprotected"),
        "{reason}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "aborted after {:?}",
        t.elapsed()
    );
    assert!(!is_stopped(target.pid), "the fault was reverted");
}
