use super::*;

const GOOD: &str = r#"
metadata:
  name: pause-a-worker
agents:
  - {name: a, address: "127.0.0.1:7070", labels: {pool: h100}}
  - {name: b, address: "127.0.0.1:7071", labels: {pool: h100}}
probes:
  - name: health
    interval: 100ms
    http:
      url: http://127.0.0.1:8000/health
      expect: {status: [200], json: {pointer: /status, equals: ok}}
  - name: port
    tcp: {address: "127.0.0.1:8000"}
steady_state: {probes: [health], duration: 1s, timeout: 10s}
method:
  - name: pause
    fault:
      kind: process
      duration: 2s
      action: pause
      target: {name: "^worker"}
    on: {labels: {pool: h100}, pick: {count: 1}}
  - wait: 1s
objectives:
  - rto: {probe: health, limit: 5s, fault: pause}
  - availability: {probe: health, min: 0.5}
stop_conditions:
  - {probe: health, failing_for: 30s}
trials: 2
"#;

fn load(text: &str) -> Result<Loaded, Vec<LoadError>> {
    load_str(text, "x.yaml", Path::new("."), "x")
}

fn errors(text: &str) -> Vec<LoadError> {
    load(text).expect_err("the experiment should be refused")
}

#[test]
fn a_good_experiment_loads() {
    let l = load(GOOD).unwrap();
    let e = &l.experiment;
    assert_eq!(e.metadata.name, "pause-a-worker");
    assert_eq!(e.probes.len(), 2);
    assert_eq!(e.trials, 2);
    assert_eq!(l.agents.len(), 2);
    assert_eq!(e.probes[0].interval, std::time::Duration::from_millis(100));
}

#[test]
fn errors_carry_line_column_and_path() {
    let bad = GOOD.replace("interval: 100ms", "interval: 5 parsecs");
    let e = errors(&bad);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].path, "probes[0].interval");
    assert_eq!((e[0].line, e[0].column), (9, 15));
    assert!(e[0].message.contains("parsecs"), "{}", e[0].message);
    assert!(
        e[0].to_string()
            .starts_with("x.yaml:9:15: probes[0].interval: ")
    );
}

#[test]
fn every_error_is_reported_at_once() {
    let bad = GOOD
        .replace("interval: 100ms", "intervl: 100ms")
        .replace("duration: 2s", "duration: 2 parsecs")
        .replace("probe: health, limit: 5s", "probe: helth, limit: 5s")
        .replace("trials: 2", "trials: two");
    let e = errors(&bad);
    let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        vec![
            "probes[0].intervl",
            "method[0].fault.duration",
            "objectives[0].rto.probe",
            "trials"
        ],
        "{e:#?}"
    );
    assert!(
        e[0].message.contains("did you mean `interval`"),
        "{}",
        e[0].message
    );
    assert!(
        e[2].message.contains("did you mean `health`"),
        "{}",
        e[2].message
    );
    // The unknown field is pointed at by its key.
    assert_eq!((e[0].line, e[0].column), (9, 5));
}

#[test]
fn references_and_counts_are_checked() {
    let bad = GOOD
        .replace("pick: {count: 1}", "pick: {count: 3}")
        .replace("fault: pause}", "fault: nope}");
    let e = errors(&bad);
    assert!(
        e.iter()
            .any(|e| e.path == "method[0].on.pick.count" && e.message.contains("only 2 match")),
        "{e:#?}"
    );
    assert!(
        e.iter().any(|e| e.path == "objectives[0].rto.fault"),
        "{e:#?}"
    );
}

#[test]
fn empty_and_odd_files() {
    assert!(errors("")[0].message.contains("empty"));
    assert!(errors("- a\n- b\n")[0].message.contains("map of sections"));
    let e = errors("probes: []\nmethod: []\n");
    assert!(
        e.iter()
            .any(|e| e.path == "method" && e.message.contains("empty")),
        "{e:?}"
    );
    let e = errors("metadata: {name: x\n");
    assert_eq!(e.len(), 1);
    assert!(e[0].line > 0, "{e:?}");
    let e = errors("kind: process\nduration: 1s\n");
    assert!(e[0].message.contains("fault spec"), "{e:?}");
    let e = errors("metdata: {}\nmethod: [{wait: 1s}]\n");
    assert!(
        e.iter()
            .any(|e| e.path == "metdata" && e.message.contains("did you mean `metadata`")),
        "{e:?}"
    );
}

#[test]
fn fault_spec_errors_are_located_inside_the_step() {
    let bad = GOOD.replace("target: {name: \"^worker\"}", "target: {name: \"(\"}");
    let e = errors(&bad);
    assert_eq!(e[0].path, "method[0].fault.target.name", "{e:?}");
    assert_eq!(e[0].line, 22);
}

#[test]
fn the_schema_describes_the_format() {
    let s = crate::experiment::json_schema();
    let text = s.to_string();
    for field in [
        "steady_state",
        "stop_conditions",
        "rto",
        "guardrail",
        "crash-loop",
    ] {
        assert!(text.contains(field), "schema lacks {field}");
    }
}

#[test]
fn the_published_schema_is_current() {
    let published: serde_json::Value =
        serde_json::from_str(include_str!("../../../../docs/experiment.schema.json"))
            .expect("docs/experiment.schema.json is JSON");
    assert!(
        published == crate::experiment::json_schema(),
        "docs/experiment.schema.json is stale: run `gpuchaos schema > docs/experiment.schema.json`"
    );
}

#[test]
fn limits_that_can_never_apply_and_absurd_durations_are_refused() {
    // A max_latency at or above the timeout (by default the interval) never fires.
    let bad = GOOD.replace(
        "expect: {status: [200], json:",
        "expect: {status: [200], max_latency: 100ms, json:",
    );
    assert_ne!(bad, GOOD, "the fixture has an http probe to extend");
    let e = errors(&bad);
    assert!(
        e.iter().any(|e| e.path.ends_with("http.expect.max_latency")
            && e.message.contains("can never apply")
            && e.message.contains("its interval, by default")),
        "{e:?}"
    );
    // availability min 0 is a valid ratio (docs: 0 to 1); 1.5 is not.
    let zero = GOOD.replace("min: 0.5", "min: 0");
    assert!(load(&zero).is_ok(), "{:?}", load(&zero).err());
    let e = errors(&GOOD.replace("min: 0.5", "min: 1.5"));
    assert!(e.iter().any(|e| e.message.contains("not a ratio")), "{e:?}");
    // A wait of eleven million years is a typo.
    let e = errors(&GOOD.replace("wait: 1s", "wait: 99999999999h"));
    assert!(
        e.iter().any(|e| e.message.contains("longer than 30 days")),
        "{e:?}"
    );
}

#[test]
fn the_parsers_limits_are_said_in_our_words() {
    let deep = format!("probes: {}{}\n", "[".repeat(2000), "]".repeat(2000));
    let e = errors(&deep);
    assert!(
        e[0].message
            .contains("more levels of nesting than the parser accepts"),
        "{e:?}"
    );
    assert!(!e[0].message.contains("budget breached"), "{e:?}");
}

#[test]
fn references_are_resolved_once_into_indexes_and_kinds() {
    let l = load(GOOD).unwrap();
    let e = &l.experiment;
    assert!(matches!(e.probes[0].kind, ProbeKind::Http(_)));
    assert!(matches!(e.probes[1].kind, ProbeKind::Tcp(_)));
    assert_eq!(e.steady_state.as_ref().unwrap().probes, vec![0]);
    assert_eq!(e.objectives[0].name, "rto health");
    assert_eq!(e.objectives[0].probe, 0);
    match &e.objectives[0].kind {
        ObjectiveKind::Rto(r) => {
            assert_eq!(r.fault.as_deref(), Some("pause"));
            assert_eq!(r.consecutive, 3);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.stop_conditions[0].name, "probe health failing for 30s");
    assert!(matches!(
        e.stop_conditions[0].kind,
        StopKind::ProbeFailing { probe: 0, .. }
    ));
    assert!(matches!(e.method[0].kind, StepKind::Fault(_)));
    assert_eq!(
        e.method[1].kind,
        StepKind::Wait(std::time::Duration::from_secs(1))
    );
    // A reference to a later probe gets that probe's index.
    let later = load(&GOOD.replace(
        "- availability: {probe: health",
        "- availability: {probe: port",
    ))
    .unwrap();
    assert_eq!(later.experiment.objectives[1].probe, 1);
}

#[test]
fn phase_objectives_detect_health_truth_and_tolerance_load_and_are_checked() {
    let with = |objectives: &str| {
        GOOD.replace(
            "objectives:\n  - rto: {probe: health, limit: 5s, fault: pause}\n  - availability: {probe: health, min: 0.5}\n",
            &format!("objectives:\n{objectives}"),
        )
        .replace("  - name: port\n", "  - name: port\n    role: readiness\n")
    };
    let good = with(
        "  - rto: {probe: health, fault: pause, from: replaced, to: ready, limit: 5m}\n  - detect: {probe: health, limit: 10s}\n  - health_truth: {health: port, truth: health, max_lying: 2s}\n  - rto: {probe: health, limit: 30s, tolerate: {failures: 1, within: 10s}}\n",
    );
    let l = load(&good).unwrap();
    let o = &l.experiment.objectives;
    let ObjectiveKind::Rto(r) = &o[0].kind else {
        panic!("{o:?}")
    };
    assert_eq!((r.from, r.to), (Phase::Replaced, Phase::Ready));
    assert!(!r.is_plain());
    assert!(matches!(o[1].kind, ObjectiveKind::Detect { .. }));
    let ObjectiveKind::HealthTruth(h) = &o[2].kind else {
        panic!("{o:?}")
    };
    assert_eq!((o[2].probe, h.truth), (1, 0));
    let ObjectiveKind::Rto(r) = &o[3].kind else {
        panic!("{o:?}")
    };
    assert_eq!(r.tolerate, Some((1, std::time::Duration::from_secs(10))));
    assert_eq!(l.experiment.probes[1].role, Some(ProbeRole::Readiness));

    // Every mistake at once, each at its field.
    let bad = with(
        "  - rto: {probe: health, from: recovered, to: end, limit: 5s}\n  - rto: {probe: health, anchor: end, from: inject, to: first_good, limit: 5s}\n  - rto: {probe: health, limit: 5s, tolerate: {failures: 0, within: 0s}}\n  - detect: {probe: health, fault: nope, limit: 0s}\n  - health_truth: {health: port, truth: port, max_lying: 1s, max_false_alarm: 0s}\n  - name: too narrow\n    rto: {probe: health, limit: 5s, tolerate: {failures: 2, within: 250ms}}\n",
    );
    let e = errors(&bad);
    let paths: Vec<&str> = e.iter().map(|e| e.path.as_str()).collect();
    for want in [
        "objectives[0].rto.from",
        "objectives[0].rto.to",
        "objectives[1].rto.from",
        "objectives[2].rto.tolerate.failures",
        "objectives[2].rto.tolerate.within",
        "objectives[3].detect.limit",
        "objectives[3].detect.fault",
        "objectives[4].health_truth.truth",
        "objectives[4].health_truth.max_false_alarm",
        "objectives[5].rto.tolerate.within",
    ] {
        assert!(paths.contains(&want), "{want} missing in {e:#?}");
    }
    let first_good = e
        .iter()
        .find(|e| e.path == "objectives[1].rto.to")
        .expect("first_good needs a generation probe");
    assert!(
        first_good.message.contains("role: generation"),
        "{}",
        first_good.message
    );
    let both = e
        .iter()
        .find(|e| e.path == "objectives[1].rto.from")
        .unwrap();
    assert!(both.message.contains("not both"), "{}", both.message);
}
