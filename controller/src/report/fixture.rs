//! A realistic journal for the renderers' tests: two probes, two trials, a failed
//! rto objective (with a tolerated failure) and a passed availability objective
//! (with its windows); trial 1's fault has recovery phases, some not observed with
//! the reasons, trial 2's none.

use std::collections::BTreeMap;

use crate::runner::record::*;

const S: u64 = 1_000_000_000;

/// One sample per second per probe for 100 s. `chat` fails during 11..=17 s, at
/// 25 s (a failure the rto tolerates) and 56..=95 s (7 runs of one state); `guard` lets an unsafe output through at 60 s
/// and fails at 61 s with a hostile error message (4 runs).
pub(crate) fn record() -> RunRecord {
    let mut samples = Vec::new();
    for t in 0..100u64 {
        let chat_ok = !(11..=17).contains(&t) && t != 25 && !(56..=95).contains(&t);
        samples.push(Sample {
            probe: 0,
            t_ns: t * S,
            end_ns: t * S + 120_000_000,
            ok: chat_ok,
            unsafe_output: false,
            error: (!chat_ok).then(|| "connection refused".to_string()),
        });
        samples.push(Sample {
            probe: 1,
            t_ns: t * S + S / 2,
            end_ns: t * S + S / 2 + 80_000_000,
            ok: t != 61 && t != 60,
            unsafe_output: t == 60,
            error: match t {
                60 => Some("unsafe completion passed the guardrail".to_string()),
                61 => Some("<script>alert(1)</script>".to_string()),
                _ => None,
            },
        });
    }
    let rto = |passed, value: f64, anchor: u64, detect: u64, recovered: u64| ObjectiveResult {
        name: "recovers in time".into(),
        kind: ResultKind::Rto,
        probe: "chat".into(),
        passed,
        value: Some(value),
        limit: 30.0,
        error_bar: Some(0.1),
        detail: format!("recovered {value}s after the fault was verified"),
        anchor_ns: Some(anchor),
        detect_ns: Some(detect),
        recovered_ns: Some(recovered),
        ..Default::default()
    };
    let availability = |value: f64, window: Window| ObjectiveResult {
        name: "chat availability".into(),
        kind: ResultKind::Availability,
        probe: "chat".into(),
        passed: true,
        value: Some(value),
        limit: 0.5,
        error_bar: None,
        detail: format!("{value} of samples ok"),
        window: Some(window),
        ..Default::default()
    };
    let window = |from: u64, to: u64, covers: &str| Window {
        from_ns: from,
        to_ns: to,
        covers: covers.into(),
    };
    RunRecord {
        format: FORMAT,
        experiment: "xid-recovery".into(),
        description: "kill a vllm worker and expect recovery".into(),
        file: "experiments/xid.yaml".into(),
        gpuchaos_version: "0.1.0".into(),
        started_unix_ms: 1_760_000_000_000,
        duration_ns: 100 * S,
        run_seed: 42,
        verdict: Verdict::Failed,
        exit_code: 1,
        reason: Some("objective \"recovers in time\" failed in 1 of 2 trials".into()),
        agents: vec![
            AgentRecord {
                name: "node-a".into(),
                address: "10.0.0.1:7070".into(),
                hostname: "gpu-a".into(),
                offset_ns: 1_250_000,
                offset_error_ns: 40_000,
                session_id: "s-1".into(),
            },
            AgentRecord {
                name: "node-b".into(),
                address: "10.0.0.2:7070".into(),
                hostname: "gpu-b".into(),
                offset_ns: -300_000,
                offset_error_ns: 55_000,
                session_id: "s-2".into(),
            },
        ],
        probes: vec![
            ProbeRecord {
                name: "chat".into(),
                kind: "openai".into(),
                target: "http://10.0.0.1:8000/v1/chat/completions".into(),
                interval_ns: S,
                timeout_ns: 5 * S,
            },
            ProbeRecord {
                name: "guard".into(),
                kind: "guardrail".into(),
                target: "http://10.0.0.1:8000/v1/chat/completions".into(),
                interval_ns: S,
                timeout_ns: 5 * S,
            },
        ],
        trials: vec![
            TrialRecord {
                index: 1,
                start_ns: 5 * S,
                first_inject_ns: Some(10 * S),
                method_end_ns: Some(20 * S),
                end_ns: 45 * S,
                faults: vec![FaultRecord {
                    step: "kill-worker".into(),
                    agent: 0,
                    id: "f-1".into(),
                    kind: "process-kill".into(),
                    summary: "SIGKILL vllm worker".into(),
                    target: "pid 4242 (vllm)".into(),
                    inject_ns: Some(10 * S),
                    end_ns: Some(12 * S),
                    end_reason: "reverted".into(),
                    ..phased()
                }],
                objectives: vec![
                    ObjectiveResult {
                        isolated_failures: vec![25 * S],
                        ..rto(true, 8.2, 10 * S, 10_500_000_000, 18_200_000_000)
                    },
                    availability(
                        0.93,
                        window(
                            10 * S,
                            18_120_000_000,
                            "first fault verified → chat recovered",
                        ),
                    ),
                ],
            },
            TrialRecord {
                index: 2,
                start_ns: 50 * S,
                first_inject_ns: Some(55 * S),
                method_end_ns: Some(60 * S),
                end_ns: 100 * S,
                faults: vec![FaultRecord {
                    step: "kill-worker".into(),
                    agent: 1,
                    id: "f-2".into(),
                    kind: "process-kill".into(),
                    summary: "SIGKILL vllm worker".into(),
                    target: "pid 5151 (vllm)".into(),
                    inject_ns: Some(55 * S),
                    end_ns: None,
                    end_reason: "run ended".into(),
                    ..Default::default()
                }],
                objectives: vec![
                    rto(false, 41.2, 55 * S, 55_500_000_000, 96_200_000_000),
                    availability(
                        0.55,
                        window(55 * S, 100 * S, "first fault verified → observation end"),
                    ),
                ],
            },
        ],
        objectives: vec![
            ObjectiveSummary {
                name: "recovers in time".into(),
                kind: ResultKind::Rto,
                probe: "chat".into(),
                passed: false,
                evaluated: true,
                unit: "s".into(),
                limit_text: "≤ 30s".into(),
                limit: 30.0,
                trials: 2,
                trials_passed: 1,
                min: Some(8.2),
                median: Some(24.7),
                max: Some(41.2),
                error_bar: Some(0.1),
                detail: "trial 2: recovered 41.2s after the fault was verified".into(),
            },
            ObjectiveSummary {
                name: "chat availability".into(),
                kind: ResultKind::Availability,
                probe: "chat".into(),
                passed: true,
                evaluated: true,
                unit: "ratio".into(),
                limit_text: "≥ 0.5".into(),
                limit: 0.5,
                trials: 2,
                trials_passed: 2,
                min: Some(0.55),
                median: Some(0.74),
                max: Some(0.93),
                error_bar: Some(0.005),
                detail: "every trial above the limit".into(),
            },
        ],
        events: vec![
            event(0, "run-start", 0, "run started with 2 agents"),
            event(5 * S, "trial-start", 1, "trial 1"),
            event(10 * S, "inject", 1, "kill-worker on node-a: process-kill"),
            event(12 * S, "revert", 1, "kill-worker reverted"),
            event(45 * S, "trial-end", 1, "trial 1 ended"),
            event(50 * S, "trial-start", 2, "trial 2"),
            event(55 * S, "inject", 2, "kill-worker on node-b: process-kill"),
            event(61 * S, "warning", 2, "guard: <script>alert(1)</script>"),
            event(100 * S, "run-end", 0, "run ended: failed"),
        ],
        samples,
        leftovers: vec![],
    }
}

/// Trial 1's fault (verified at 10 s): chat fails from 11 s and answers again at
/// 18.12 s; the agent saw pid 4321 replace pid 4242 at 12.5 s, holding 2 GiB from
/// 15.5 s; masked and ready were not observed (with why), the readiness durations
/// are null.
fn phased() -> FaultRecord {
    const CLOCK: u64 = 40_000;
    let chat = |t_ns: u64, sample: u64| PhaseMark {
        t_ns,
        error_ns: S + CLOCK,
        probe: Some("chat".into()),
        sample_t_ns: Some(sample),
        ..Default::default()
    };
    let agent = |t_ns: u64, event: &str, gpu_bytes: Option<u64>| PhaseMark {
        t_ns,
        error_ns: S / 2 + CLOCK,
        event: Some(event.into()),
        pid: Some(4321),
        gpu_bytes,
        ..Default::default()
    };
    FaultRecord {
        phases: Phases {
            detected: Some(chat(11 * S, 11 * S)),
            masked: None,
            replaced: Some(agent(12_500_000_000, "pid 4321 replaced pid 4242", None)),
            gpu_ready: Some(agent(15_500_000_000, "GPU memory settled", Some(2 << 30))),
            ready: None,
            first_good: Some(chat(18_120_000_000, 18 * S)),
            recovered: Some(chat(18_120_000_000, 18 * S)),
        },
        phase_durations: PhaseDurations {
            detect: Some(1.0),
            replace: Some(2.5),
            load: Some(3.0),
            total: Some(8.12),
            ..Default::default()
        },
        probe_phases: vec![ProbePhases {
            probe: "chat".into(),
            role: Some("generation".into()),
            detected: Some(chat(11 * S, 11 * S)),
            masked: None,
            first_pass: Some(chat(18_120_000_000, 18 * S)),
            recovered: Some(chat(18_120_000_000, 18 * S)),
            isolated_failures: vec![25 * S],
        }],
        phase_probe: "chat".into(),
        phase_notes: BTreeMap::from([
            (
                "masked".to_string(),
                "chat did not pass 3 in a row while the fault was active".to_string(),
            ),
            (
                "ready".to_string(),
                "no probe has `role: readiness` (a health endpoint)".to_string(),
            ),
        ]),
        ..Default::default()
    }
}

fn event(t_ns: u64, kind: &str, trial: u32, message: &str) -> Event {
    Event {
        t_ns,
        kind: EventKind::parse(kind),
        trial,
        message: message.into(),
    }
}
