//! The game-day page and the HTML report as a real browser draws them: `gpuchaos
//! serve` with 149 earlier runs waiting in its state directory (as a locked
//! database leaves them: `run.json` and `.pending`) and one real run it makes
//! itself, then headless Chromium (Debian's, with Debian's default fonts).
//!
//! - the trend chart of the run's objective: one mark per run shown (the last 60
//!   of 150), a cross for every failed run and a dot for every passed one, a grey
//!   band for every run that did not evaluate it, the limit line where the marks'
//!   own scale puts 10 s, every mark in time order;
//! - an objective named `<script>...` shows as text, never as an element;
//! - every non-ASCII character the page, the run page and the report use has a
//!   font (`fc-list :charset=...`) and draws as a glyph, not as the box a missing
//!   glyph draws (compared pixel for pixel on a canvas, in the report's font
//!   stack, against two code points no font has);
//! - screenshots of the page, the run page, the report and a glyph sheet go to
//!   `target/test-artefacts/page/` (printed), for people to look at.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gpuchaos_tests::*;

const DAY_MS: i64 = 86_400_000;
/// 2026-11-25T13:00:00Z: the slot the real run takes (14:00 in Berlin).
const SLOT_MS: i64 = 1_795_611_600_000;
const REAL_RUN: &str = "nightly-20261125T130000Z";
const SCRIPT_NAME: &str = "<script>alert(1)</script> & \"quotes\"";

struct Serve {
    child: Child,
    url: String,
}

impl Serve {
    /// Its log goes to `log`.
    fn start(gameday: &Path, state: &Path, clock: &str, log: &Path) -> Serve {
        let mut child = Command::new(bin("gpuchaos"))
            .args(["serve", "--gameday", gameday.to_str().unwrap()])
            .args(["--state-dir", state.to_str().unwrap()])
            .args(["--listen", "127.0.0.1:0"])
            .env("GPUCHAOS_CLOCK", clock)
            .env("GPUCHAOS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
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

    fn get(&self, path: &str) -> String {
        let host = self.url.strip_prefix("http://").unwrap();
        let mut s = TcpStream::connect(host).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    fn body(&self, path: &str) -> String {
        let r = self.get(path);
        r.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

/// `target/test-artefacts/page`, next to the binaries under test.
fn artefacts() -> PathBuf {
    let gpuchaos = bin("gpuchaos");
    let target = gpuchaos
        .parent()
        .and_then(Path::parent)
        .expect("target dir");
    let dir = target.join("test-artefacts").join("page");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn dom(url: &str) -> String {
    String::from_utf8_lossy(&chromium(&["--dump-dom", url]).stdout).into_owned()
}

fn screenshot(url: &str, file: &Path, size: &str) {
    let _ = std::fs::remove_file(file);
    chromium(&[
        &format!("--screenshot={}", file.display()),
        &format!("--window-size={size}"),
        url,
    ]);
    let png = std::fs::read(file).unwrap_or_default();
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000,
        "no screenshot of {url} in {}",
        file.display()
    );
    println!("screenshot: {}", file.display());
}

/// One seeded run: day `k` before the real run's slot.
struct Seed {
    id: String,
    started: i64,
    /// None: the experiment did not load, nothing was evaluated.
    rto: Option<f64>,
}

fn seeds() -> Vec<Seed> {
    (1..=149)
        .rev()
        .map(|k: i64| {
            let started = SLOT_MS - k * DAY_MS;
            let id = format!("nightly-{}", utc(started).replace(['-', ':'], ""));
            let rto = if k % 13 == 0 {
                None
            } else if k % 9 == 0 {
                Some(12.0 + (k % 3) as f64)
            } else {
                Some(2.0 + (k % 7) as f64 * 0.8)
            };
            Seed { id, started, rto }
        })
        .collect()
}

/// `YYYY-MM-DDTHH:MM:SSZ` of a Unix time in ms, by hand (the tests do not depend
/// on a date crate): days from the civil-from-days algorithm.
fn utc(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn seed_summary(s: &Seed) -> serde_json::Value {
    let passed = s.rto.is_some_and(|v| v <= 10.0);
    let verdict = match s.rto {
        None => "error",
        Some(_) if passed => "passed",
        Some(_) => "failed",
    };
    let objectives = match s.rto {
        None => serde_json::json!([]),
        Some(v) => serde_json::json!([
            {"name": "recovery", "kind": "rto", "unit": "s", "measured": v,
             "limit": "≤ 10s", "passed": passed},
            {"name": SCRIPT_NAME, "kind": "availability", "unit": "ratio",
             "measured": if passed { 0.9995 } else { 0.97 },
             "limit": "≥ 99.00%", "passed": passed},
        ]),
    };
    let exit_code = match verdict {
        "passed" => 0,
        "failed" => 1,
        _ => 64,
    };
    let reason = (verdict == "error").then_some("pause.yaml: cannot load");
    serde_json::json!({
        "format": 1, "id": s.id, "gameday": "nightly", "file": "nightly.yaml",
        "trigger": "schedule", "slot_unix_ms": s.started, "missed_slots": 0,
        "revision": 3, "started_unix_ms": s.started, "ended_unix_ms": s.started + 20_000,
        "verdict": verdict, "exit_code": exit_code, "reason": reason,
        "controller": "seed pid 1",
        "experiments": [{
            "seq": 1, "name": "pause-target", "file": "pause.yaml", "verdict": verdict,
            "exit_code": 0, "reason": null, "report_dir": null, "duration_ms": 20_000,
            "objectives": objectives,
        }],
        "notifications": [],
    })
}

fn attr<'a>(n: &roxmltree::Node<'a, '_>, name: &str) -> &'a str {
    n.attribute(name)
        .unwrap_or_else(|| panic!("no {name} on {n:?}"))
}

fn num(n: &roxmltree::Node<'_, '_>, name: &str) -> f64 {
    attr(n, name).parse().unwrap()
}

/// The page's trend charts, by their title.
fn charts(html: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = html;
    while let Some(i) = rest.find("<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"trend\"") {
        let end = rest[i..].find("</svg>").unwrap() + i + "</svg>".len();
        let svg = rest[i..end].to_string();
        let doc = roxmltree::Document::parse(&svg)
            .unwrap_or_else(|e| panic!("a chart is not well-formed SVG ({e}): {svg}"));
        let title = doc
            .descendants()
            .find(|n| n.has_tag_name("title"))
            .and_then(|n| n.text())
            .unwrap()
            .to_string();
        out.insert(title, svg);
        rest = &rest[end..];
    }
    out
}

/// The glyph sheet: each character in the report's font stack on a canvas,
/// compared with what two code points no font has draw (the missing-glyph box).
fn glyph_page(chars: &BTreeSet<char>) -> String {
    let list: Vec<String> = chars.iter().map(|c| format!("0x{:x}", *c as u32)).collect();
    let big: String = chars.iter().collect();
    format!(
        r##"<!DOCTYPE html><html><head><meta charset="utf-8"><style>
body{{font:14px/1.45 system-ui,sans-serif;margin:24px}}p{{font-size:40px;margin:8px 0}}</style></head>
<body><p>ours: {big}</p><p>emoji (the old marks): &#x2705; &#x274c; &#x26a0;&#xfe0f; &#x23ed;&#xfe0f;</p>
<p>missing: &#x10fffd; &#x10fffc;</p><pre id="out"></pre>
<script>
const font = "28px system-ui, sans-serif";
function px(cp) {{
  const c = document.createElement("canvas"); c.width = 48; c.height = 48;
  const x = c.getContext("2d"); x.font = font; x.fillStyle = "#000"; x.textBaseline = "middle";
  x.fillText(String.fromCodePoint(cp), 6, 24);
  return Array.from(x.getImageData(0, 0, 48, 48).data).join(",");
}}
const blank = (() => {{ const c = document.createElement("canvas"); c.width = 48; c.height = 48;
  return Array.from(c.getContext("2d").getImageData(0, 0, 48, 48).data).join(","); }})();
const box = px(0x10fffd);
const lines = [];
lines.push("control " + (px(0x10fffc) === box ? "same" : "differs") + " " + (box === blank ? "blank" : "drawn"));
for (const cp of [0x41, 0x2705, 0x274c, {list}]) {{
  const p = px(cp);
  lines.push(cp.toString(16) + " " + (p === box ? "BOX" : p === blank ? "BLANK" : "glyph"));
}}
document.getElementById("out").textContent = lines.join("\n");
</script></body></html>"##,
        list = list.join(", ")
    )
}

#[test]
fn trends_are_drawn_per_run_against_the_limit_and_every_glyph_has_a_font() {
    let out_dir = artefacts();
    println!("artefacts: {}", out_dir.display());
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&dir.path().join("agent"));
    let target = Target::spawn();
    let objectives =
        "objectives:\n  - name: recovery\n    rto: {probe: health, limit: 10s, consecutive: 3}\n";
    std::fs::write(
        dir.path().join("pause.yaml"),
        pause_experiment(&agent, &target, "1s", objectives),
    )
    .unwrap();
    let gd = dir.path().join("nightly.yaml");
    std::fs::write(
        &gd,
        "name: nightly\ndescription: pause the target, expect recovery\nschedule: {cron: \"0 14 * * *\", timezone: Europe/Berlin}\nexperiments: [pause.yaml]\nmax_duration: 2m\nstart_deadline: 10s\n",
    )
    .unwrap();

    // 149 earlier runs, one a day, waiting to be indexed.
    let state = dir.path().join("state");
    let seeds = seeds();
    for s in &seeds {
        let d = state.join("runs").join(&s.id);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("run.json"),
            serde_json::to_string_pretty(&seed_summary(s)).unwrap(),
        )
        .unwrap();
        std::fs::write(d.join(".pending"), b"").unwrap();
    }
    assert_eq!(seeds.last().unwrap().id, "nightly-20261124T130000Z");

    let log = out_dir.join("serve.log");
    println!("serve's log: {}", log.display());
    let serve = Serve::start(&gd, &state, "2026-11-25T12:59:57Z", &log);
    let done = wait_until(Duration::from_secs(90), || {
        let st: serde_json::Value =
            serde_json::from_str(&serve.body("/api/status")).unwrap_or_default();
        st["runs"][0]["id"] == REAL_RUN
            && st["runs"][0]["verdict"] != "running"
            && st["gamedays"][0]["running"].is_null()
    });
    assert!(done.is_some(), "the real run did not end");
    let st: serde_json::Value = serde_json::from_str(&serve.body("/api/status")).unwrap();
    let real = &st["runs"][0]["experiments"][0]["objectives"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "recovery")
        .cloned()
        .unwrap_or_default();
    println!("the real run: {}", st["runs"][0]);

    // What the recovery chart must show: the last 59 seeds and the real run.
    let mut want_runs: Vec<(String, Option<f64>, bool)> = seeds[seeds.len() - 59..]
        .iter()
        .map(|s| (s.id.clone(), s.rto, s.rto.is_some_and(|v| v <= 10.0)))
        .collect();
    want_runs.push((
        REAL_RUN.into(),
        real["measured"].as_f64(),
        real["passed"] == true,
    ));
    let want_ok: BTreeSet<&str> = want_runs
        .iter()
        .filter(|r| r.1.is_some() && r.2)
        .map(|r| r.0.as_str())
        .collect();
    let want_fail: BTreeSet<&str> = want_runs
        .iter()
        .filter(|r| r.1.is_some() && !r.2)
        .map(|r| r.0.as_str())
        .collect();
    let want_gap: BTreeSet<&str> = want_runs
        .iter()
        .filter(|r| r.1.is_none())
        .map(|r| r.0.as_str())
        .collect();
    assert!(want_fail.len() >= 5 && want_gap.len() >= 4);

    let page = serve.body("/");
    let charts = charts(&page);
    let (title, svg) = charts
        .iter()
        .find(|(t, _)| t.starts_with("pause-target · recovery "))
        .unwrap_or_else(|| panic!("no recovery chart among {:?}", charts.keys()));
    assert_eq!(
        title,
        "pause-target · recovery (RTO, s) over the last 60 of 150 runs"
    );
    let doc = roxmltree::Document::parse(svg).unwrap();
    let root = doc.root_element();
    assert_eq!(attr(&root, "role"), "img");
    assert_eq!(attr(&root, "data-runs"), "60");
    let marks = |class: &str| -> Vec<roxmltree::Node<'_, '_>> {
        doc.descendants()
            .filter(|n| n.attribute("class") == Some(class))
            .collect()
    };
    let ids = |nodes: &[roxmltree::Node<'_, '_>]| -> BTreeSet<String> {
        nodes
            .iter()
            .map(|n| attr(n, "data-run-id").to_string())
            .collect()
    };
    let ok = marks("pt ok");
    let fail = marks("pt fail");
    let gaps = marks("t-gap");
    assert_eq!(
        ok.len() + fail.len() + gaps.len(),
        60,
        "one mark or band per run"
    );
    let s = |set: &BTreeSet<&str>| set.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(ids(&ok), s(&want_ok), "passed runs are dots");
    assert_eq!(ids(&fail), s(&want_fail), "failed runs are crosses");
    assert_eq!(ids(&gaps), s(&want_gap), "runs without a value are gaps");
    assert!(ok.iter().all(|n| n.has_tag_name("circle")));
    assert!(fail.iter().all(|n| n.has_tag_name("path")));

    // Every mark's position: x in run order, y on one linear scale, and the limit
    // line where that scale puts 10 s.
    let mut points: Vec<(usize, f64, f64, f64)> = Vec::new(); // (run index, x, y, value)
    for n in ok.iter().chain(&fail) {
        let run = attr(n, "data-run-id");
        let i = want_runs.iter().position(|r| r.0 == run).unwrap();
        let (x, y) = if n.has_tag_name("circle") {
            (num(n, "cx"), num(n, "cy"))
        } else {
            let d = attr(n, "d");
            let m: Vec<f64> = d[1..d.find('m').unwrap()]
                .split(' ')
                .map(|v| v.parse().unwrap())
                .collect();
            (m[0], m[1])
        };
        points.push((i, x, y, num(n, "data-value")));
    }
    points.sort_by_key(|p| p.0);
    assert!(points.windows(2).all(|w| w[0].1 < w[1].1), "x follows time");
    let lo = points.iter().min_by(|a, b| a.3.total_cmp(&b.3)).unwrap();
    let hi = points.iter().max_by(|a, b| a.3.total_cmp(&b.3)).unwrap();
    let scale = |v: f64| lo.2 + (v - lo.3) * (hi.2 - lo.2) / (hi.3 - lo.3);
    for p in &points {
        assert!((p.2 - scale(p.3)).abs() < 0.05, "mark off the scale: {p:?}");
    }
    assert!(hi.2 < lo.2, "larger values are higher up");
    let limits = marks("t-limit");
    assert_eq!(limits.len(), 1, "one limit all along");
    let ly = num(&limits[0], "y1");
    assert!(
        (ly - scale(10.0)).abs() < 0.05,
        "limit at y {ly}, the scale puts 10s at {}",
        scale(10.0)
    );
    for p in &points {
        assert_eq!(
            p.2 < ly,
            p.3 > 10.0,
            "above the line iff over the limit: {p:?}"
        );
    }
    let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).collect();
    assert!(texts.contains(&"RTO (s)"), "y axis title: {texts:?}");
    assert!(texts.contains(&"limit ≤ 10s"), "{texts:?}");
    assert!(
        texts
            .iter()
            .any(|t| t.starts_with("run start (Europe/Berlin)")
                && t.ends_with("the last 60 of 150 runs")),
        "{texts:?}"
    );

    // A name from YAML is text, in the raw page and in the browser's DOM.
    assert!(
        !page.contains("<script"),
        "an objective name was not escaped"
    );
    assert!(
        charts
            .keys()
            .any(|t| t.starts_with(&format!("pause-target · {SCRIPT_NAME} (availability, %)"))),
        "{:?}",
        charts.keys()
    );
    let browser = dom(&format!("{}/", serve.url));
    assert!(browser.contains("<h2>Trends</h2>"), "{browser}");
    assert!(!browser.contains("<script"), "{browser}");
    assert!(browser.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; \"quotes\""));

    // The run page links to the run's report; /runs/ID sends to /runs/ID/.
    let run_page = serve.body(&format!("/runs/{REAL_RUN}/"));
    let report_link = format!("/runs/{REAL_RUN}/01-pause-target/report.html");
    assert!(
        run_page.contains(&format!(
            "<p id=\"reports\"><b>report:</b> <a class=\"report\" href=\"{report_link}\">"
        )),
        "{run_page}"
    );
    let moved = serve.get(&format!("/runs/{REAL_RUN}"));
    assert!(
        moved.starts_with("HTTP/1.1 301")
            && moved.contains(&format!("location: /runs/{REAL_RUN}/")),
        "{moved}"
    );
    let report = serve.body(&report_link);
    assert!(report.contains("pause-target: "), "{report}");

    // Screenshots, for people.
    screenshot(
        &format!("{}/", serve.url),
        &out_dir.join("page.png"),
        "1280,2200",
    );
    screenshot(
        &format!("{}/runs/{REAL_RUN}/", serve.url),
        &out_dir.join("run.png"),
        "1280,700",
    );
    screenshot(
        &format!("{}{report_link}", serve.url),
        &out_dir.join("report.png"),
        "1280,1400",
    );

    // Every non-ASCII character the three pages use has a font and draws a glyph.
    let chars: BTreeSet<char> = [&page, &run_page, &report]
        .iter()
        .flat_map(|t| t.chars())
        .filter(|c| !c.is_ascii())
        .collect();
    assert!(chars.contains(&'✓'), "{chars:?}");
    for c in &chars {
        let fc = Command::new("fc-list")
            .args([&format!(":charset={:x}", *c as u32), "family"])
            .output()
            .expect("fc-list (fontconfig) is missing");
        assert!(
            !String::from_utf8_lossy(&fc.stdout).trim().is_empty(),
            "no installed font has {c:?} (U+{:04X})",
            *c as u32
        );
    }
    let sheet = out_dir.join("glyphs.html");
    std::fs::write(&sheet, glyph_page(&chars)).unwrap();
    let url = format!("file://{}", sheet.display());
    let result = dom(&url);
    let out = &result[result
        .find("<pre id=\"out\">")
        .expect("the glyph check ran")..];
    let out = &out["<pre id=\"out\">".len()..out.find("</pre>").unwrap()];
    println!("glyphs in headless chromium:\n{out}");
    let lines: BTreeMap<&str, &str> = out.lines().filter_map(|l| l.split_once(' ')).collect();
    // Missing glyphs draw alike (a box, or nothing at all): a glyph must draw
    // something else.
    assert!(
        lines["control"].starts_with("same "),
        "two code points no font has must draw alike: {out}"
    );
    assert_eq!(lines["41"], "glyph", "'A' must draw");
    for c in &chars {
        let key = format!("{:x}", *c as u32);
        assert_eq!(
            lines.get(key.as_str()).copied(),
            Some("glyph"),
            "{c:?} (U+{:04X}) draws as a missing-glyph box in headless chromium",
            *c as u32
        );
    }
    screenshot(&url, &out_dir.join("glyphs.png"), "1000,640");
}
