//! Recovery phases (docs/experiments.md, "Recovery phases"): where a fault's
//! recovery time went, from the probes' samples and the agent's observations, on
//! the run's timeline. Pure functions, tested on their own with known truth.
//!
//! Probe phases (per probe): `detected` (first failing sample after the fault was
//! verified), `masked` (the first of N passes in a row, after the detection, that
//! all ended while the fault was still active), `first_pass` (the first pass after
//! the outage's last failure), `recovered` (the first of N passes in a row after
//! the last failure of the outage). Fault phases: those of the fault's phase probe,
//! the agent's `replaced` and `gpu_ready`, `ready` (the readiness probe passing
//! again after its last failure) and `first_good` (the generation probe's first
//! pass after its outage).
//!
//! Error bars: a sample-marked phase happened at most one probe interval before
//! its sample (the previous sample still saw the old state) plus the agent clock
//! mapping's error (the fault's own time is the agent's); an agent observation at
//! most one watch interval before it was seen, plus the same mapping error.

use std::collections::BTreeMap;

use super::evaluate::{self, Tolerance};
use super::record::{PhaseDurations, PhaseMark, Phases, ProbePhases, Sample};
use crate::experiment::{Phase, ProbeRole};

const NS: f64 = 1e9;

/// A probe as the phases need it.
#[derive(Debug, Clone)]
pub struct ProbeInfo {
    pub index: usize,
    pub name: String,
    pub interval_ns: u64,
    pub role: Option<ProbeRole>,
    /// Passes in a row for `masked` and `recovered` (an RTO objective's, or 3).
    pub consecutive: u32,
    pub tolerate: Option<Tolerance>,
}

/// The fault on the run's timeline.
#[derive(Debug, Clone, Copy)]
pub struct FaultTimes {
    pub verified_ns: u64,
    pub end_ns: Option<u64>,
    /// The phases are looked for in samples started before this (the next fault's
    /// injection, or the trial's end).
    pub window_end: u64,
    /// The agent clock mapping's error bar.
    pub clock_error_ns: u64,
    /// The effect lasts while the fault is active (a pause, a partition, memory
    /// held), so the service can route around it: `masked` applies. A kill's
    /// effect is instant.
    pub sustained: bool,
    /// The agent watches for a replacement only from the fault's end (crash-loop):
    /// time to replace counts from there.
    pub replaced_from_end: bool,
}

/// An agent observation, mapped onto the run's timeline.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub kind: String,
    pub t_ns: u64,
    pub error_ns: u64,
    pub pid: u32,
    pub gpu_bytes: u64,
    pub detail: String,
}

/// A phase marked by a sample: at its start (a failure: the request sent then got
/// no good answer) or at its end (a pass: an answer was seen then). The phase
/// happened at most one interval before the mark, plus, for an answer, the time the
/// answer took (the service may have come back any time while it was on its way).
fn sample_mark(p: &ProbeInfo, s: &Sample, at_end: bool, f: &FaultTimes) -> PhaseMark {
    let answer = if at_end { s.latency_ns() } else { 0 };
    PhaseMark {
        t_ns: if at_end { s.end_ns } else { s.t_ns },
        error_ns: p.interval_ns + answer + f.clock_error_ns,
        probe: Some(p.name.clone()),
        sample_t_ns: Some(s.t_ns),
        ..Default::default()
    }
}

/// One probe's phases for one fault.
pub fn probe_phases(samples: &[Sample], p: &ProbeInfo, f: &FaultTimes) -> ProbePhases {
    let w = evaluate::window(samples, p.index, f.verified_ns, f.window_end);
    let r = evaluate::recovery_with(&w, p.consecutive, p.tolerate);
    let mut out = ProbePhases {
        probe: p.name.clone(),
        role: p.role.map(|r| r.as_str().to_string()),
        isolated_failures: r.isolated.clone(),
        ..Default::default()
    };
    let Some(detect_ns) = r.detect_ns else {
        return out;
    };
    let first = w.iter().position(|s| s.t_ns == detect_ns).unwrap_or(0);
    out.detected = Some(sample_mark(p, w[first], false, f));
    // The first good answer after the outage: a lucky answer in the middle of it (a
    // retry, another replica) is not the service being back.
    out.first_pass = r
        .last_outage_ns
        .and_then(|last| w.iter().find(|s| s.ok && s.t_ns > last))
        .map(|s| sample_mark(p, s, true, f));
    out.recovered = r.recovered_ns.and_then(|t| {
        w.iter()
            .find(|s| s.ok && s.end_ns == t)
            .map(|s| sample_mark(p, s, true, f))
    });
    // Masked: N passes in a row after the detection, all answered before the end.
    if let Some(end) = f.end_ns.filter(|_| f.sustained) {
        let n = p.consecutive.max(1) as usize;
        let after = &w[first..];
        let mut run = 0;
        for (i, s) in after.iter().enumerate() {
            if s.end_ns >= end {
                break;
            }
            if s.ok {
                run += 1;
                if run == n {
                    out.masked = Some(sample_mark(p, after[i + 1 - n], true, f));
                    break;
                }
            } else {
                run = 0;
            }
        }
    }
    out
}

/// The fault's phases, read through `primary` (an index into `probes`), with every
/// probe's own phases and, for each null phase, why.
pub fn fault_phases(
    samples: &[Sample],
    probes: &[ProbeInfo],
    primary: usize,
    f: &FaultTimes,
    observed: &[Observed],
) -> (Phases, Vec<ProbePhases>, BTreeMap<String, String>) {
    let per: Vec<ProbePhases> = probes.iter().map(|p| probe_phases(samples, p, f)).collect();
    let mut notes = BTreeMap::new();
    let mut phases = Phases::default();
    let main = &probes[primary];
    let pp = &per[primary];
    phases.detected = pp.detected.clone();
    phases.masked = pp.masked.clone();
    phases.recovered = pp.recovered.clone();
    if pp.detected.is_none() {
        notes.insert(
            "detected".into(),
            format!("{} never failed after the fault was verified", main.name),
        );
    } else {
        if !f.sustained {
            notes.insert(
                "masked".into(),
                "a kill or terminate takes effect at once: nothing of it lasts to route around"
                    .into(),
            );
        } else if pp.masked.is_none() && f.end_ns.is_none() {
            notes.insert(
                "masked".into(),
                "the fault had not ended when the phases were read".into(),
            );
        } else if pp.masked.is_none() {
            notes.insert(
                "masked".into(),
                format!(
                    "{} did not pass {} in a row while the fault was active",
                    main.name, main.consecutive
                ),
            );
        }
        if pp.recovered.is_none() {
            notes.insert(
                "recovered".into(),
                format!("{} had not recovered when the observation ended", main.name),
            );
        }
    }
    let agent_mark = |o: &Observed| PhaseMark {
        t_ns: o.t_ns,
        error_ns: o.error_ns + f.clock_error_ns,
        event: Some(o.detail.clone()),
        pid: Some(o.pid),
        gpu_bytes: (o.gpu_bytes > 0).then_some(o.gpu_bytes),
        ..Default::default()
    };
    let replaced = observed
        .iter()
        .filter(|o| o.kind == "replaced")
        .min_by_key(|o| o.t_ns);
    match replaced {
        Some(r) => {
            phases.replaced = Some(agent_mark(r));
            match observed
                .iter()
                .find(|o| o.kind == "gpu_ready" && o.pid == r.pid)
            {
                Some(g) => phases.gpu_ready = Some(agent_mark(g)),
                None => {
                    notes.insert(
                        "gpu_ready".into(),
                        format!(
                            "the agent saw no GPU memory settle for pid {} (no NVML on the agent, or the replacement holds none)",
                            r.pid
                        ),
                    );
                }
            }
        }
        None => {
            let why = "the agent saw no replacement (the fault kills nothing, aims at a pid, or nothing restarted the target before the trial ended)";
            notes.insert("replaced".into(), why.into());
            notes.insert("gpu_ready".into(), "no replacement to watch".into());
        }
    }
    // ready: the readiness probe passes again after its last failure.
    match role_probe(probes, ProbeRole::Readiness) {
        None => {
            notes.insert(
                "ready".into(),
                "no probe has `role: readiness` (a health endpoint)".into(),
            );
        }
        Some(i) => {
            let p = &probes[i];
            let w = evaluate::window(samples, p.index, f.verified_ns, f.window_end);
            let r = evaluate::recovery_with(&w, 1, p.tolerate);
            match (r.detect_ns, r.recovered_ns) {
                (None, _) => {
                    notes.insert(
                        "ready".into(),
                        format!(
                            "{} (readiness) never failed: it did not see the outage",
                            p.name
                        ),
                    );
                }
                (Some(_), None) => {
                    notes.insert(
                        "ready".into(),
                        format!("{} (readiness) did not pass again", p.name),
                    );
                }
                (Some(_), Some(t)) => {
                    phases.ready = w
                        .iter()
                        .find(|s| s.ok && s.end_ns == t)
                        .map(|s| sample_mark(p, s, true, f));
                }
            }
        }
    }
    match role_probe(probes, ProbeRole::Generation) {
        None => {
            notes.insert(
                "first_good".into(),
                "no probe has `role: generation` (an openai probe has it by default)".into(),
            );
        }
        Some(i) => {
            let g = &per[i];
            phases.first_good = g.first_pass.clone();
            if g.detected.is_none() {
                notes.insert(
                    "first_good".into(),
                    format!("{} (generation) never failed", probes[i].name),
                );
            } else if g.first_pass.is_none() {
                notes.insert(
                    "first_good".into(),
                    format!("{} (generation) never passed again", probes[i].name),
                );
            }
        }
    }
    (phases, per, notes)
}

fn role_probe(probes: &[ProbeInfo], role: ProbeRole) -> Option<usize> {
    probes.iter().position(|p| p.role == Some(role))
}

/// The durations between phases, in seconds.
pub fn durations(f: &FaultTimes, p: &Phases) -> PhaseDurations {
    let verified_ns = f.verified_ns;
    let replace_from = if f.replaced_from_end {
        f.end_ns.unwrap_or(verified_ns)
    } else {
        verified_ns
    };
    let between = |a: Option<u64>, b: Option<&PhaseMark>| -> Option<f64> {
        Some((b?.t_ns as f64 - a? as f64) / NS)
    };
    let t = |m: &Option<PhaseMark>| m.as_ref().map(|m| m.t_ns);
    PhaseDurations {
        detect: between(Some(verified_ns), p.detected.as_ref()),
        replace: between(Some(replace_from), p.replaced.as_ref()),
        load: between(t(&p.replaced), p.gpu_ready.as_ref()),
        warm_up: between(t(&p.gpu_ready), p.ready.as_ref()),
        cold_start: between(t(&p.replaced), p.ready.as_ref()),
        first_good_after_ready: between(t(&p.ready), p.first_good.as_ref()),
        total: between(Some(verified_ns), p.recovered.as_ref()),
    }
}

/// A phase as an objective reads it: `inject` and `end` from the fault, the others
/// from the phases; Err says why it is missing.
pub fn phase_mark(
    phase: Phase,
    f: &FaultTimes,
    phases: &Phases,
    notes: &BTreeMap<String, String>,
) -> Result<PhaseMark, String> {
    let fault_time = |t: u64| PhaseMark {
        t_ns: t,
        error_ns: f.clock_error_ns,
        ..Default::default()
    };
    match phase {
        Phase::Inject => Ok(fault_time(f.verified_ns)),
        Phase::End => f
            .end_ns
            .map(fault_time)
            .ok_or_else(|| "the fault has not ended".to_string()),
        _ => phases.get(phase.as_str()).cloned().ok_or_else(|| {
            notes
                .get(phase.as_str())
                .cloned()
                .unwrap_or_else(|| "not observed".into())
        }),
    }
}

/// Lying and false-alarm time of a health probe against a truth probe, over
/// [from, to): each sample's outcome holds from its start until the next sample of
/// its probe. Returns (lying ns, false alarm ns, lying periods).
pub fn health_truth(
    samples: &[Sample],
    health: usize,
    truth: usize,
    from: u64,
    to: u64,
) -> Option<(u64, u64, usize)> {
    let h = evaluate::window(samples, health, from, to);
    let t = evaluate::window(samples, truth, from, to);
    if h.is_empty() || t.is_empty() {
        return None;
    }
    // The states as steps: (start, ok), each until the next one (the last until `to`).
    let steps = |v: &[&Sample]| -> Vec<(u64, bool)> { v.iter().map(|s| (s.t_ns, s.ok)).collect() };
    let (hs, ts) = (steps(&h), steps(&t));
    let start = hs[0].0.max(ts[0].0);
    let mut cuts: Vec<u64> = hs
        .iter()
        .chain(ts.iter())
        .map(|s| s.0)
        .filter(|&c| c > start && c < to)
        .collect();
    cuts.push(start);
    cuts.push(to);
    cuts.sort_unstable();
    cuts.dedup();
    let state = |v: &[(u64, bool)], at: u64| -> bool {
        let i = v.partition_point(|s| s.0 <= at);
        v[i.saturating_sub(1)].1
    };
    let (mut lying, mut alarm, mut periods) = (0u64, 0u64, 0usize);
    let mut was_lying = false;
    for w in cuts.windows(2) {
        let (a, b) = (w[0], w[1]);
        let (ho, to_ok) = (state(&hs, a), state(&ts, a));
        let lie = ho && !to_ok;
        if lie {
            lying += b - a;
            if !was_lying {
                periods += 1;
            }
        } else if !ho && to_ok {
            alarm += b - a;
        }
        was_lying = lie;
    }
    Some((lying, alarm, periods))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// A probe sampled every `every` ms from 0 to `until`, failing in [down, up),
    /// each answer taking 5 ms.
    fn series(probe: usize, every: u64, down: u64, up: u64, until: u64) -> Vec<Sample> {
        (0..until / every)
            .map(|i| {
                let t = i * every * MS;
                Sample {
                    probe,
                    t_ns: t,
                    end_ns: t + 5 * MS,
                    ok: !(down * MS..up * MS).contains(&t),
                    ..Default::default()
                }
            })
            .collect()
    }

    fn info(index: usize, name: &str, role: Option<ProbeRole>) -> ProbeInfo {
        ProbeInfo {
            index,
            name: name.into(),
            interval_ns: 100 * MS,
            role,
            consecutive: 3,
            tolerate: None,
        }
    }

    fn times(verified: u64, end: Option<u64>) -> FaultTimes {
        FaultTimes {
            verified_ns: verified * MS,
            end_ns: end.map(|e| e * MS),
            window_end: u64::MAX,
            clock_error_ns: MS,
            sustained: true,
            replaced_from_end: false,
        }
    }

    fn obs(kind: &str, t: u64, pid: u32, bytes: u64) -> Observed {
        Observed {
            kind: kind.into(),
            t_ns: t * MS,
            error_ns: 100 * MS,
            pid,
            gpu_bytes: bytes,
            detail: format!("{kind} {pid}"),
        }
    }

    #[test]
    fn a_killed_worker_replaced_loaded_and_ready_shows_every_phase() {
        // Killed at 1000 ms; chat fails 1000..6000, health fails 1000..5500.
        let mut s = series(0, 100, 1_000, 6_000, 10_000);
        s.extend(series(1, 100, 1_000, 5_500, 10_000));
        let probes = [
            info(0, "chat", Some(ProbeRole::Generation)),
            info(1, "health", Some(ProbeRole::Readiness)),
        ];
        let o = [
            obs("replaced", 2_000, 42, 0),
            obs("gpu_ready", 5_000, 42, 3 << 30),
        ];
        let f = times(1_000, Some(1_001));
        let (p, per, notes) = fault_phases(&s, &probes, 0, &f, &o);
        let at = |m: &Option<PhaseMark>| m.as_ref().map(|m| m.t_ns / MS);
        assert_eq!(at(&p.detected), Some(1_000));
        assert_eq!(at(&p.masked), None, "the fault ended before any pass");
        assert_eq!(at(&p.replaced), Some(2_000));
        assert_eq!(at(&p.gpu_ready), Some(5_000));
        assert_eq!(p.gpu_ready.as_ref().unwrap().gpu_bytes, Some(3 << 30));
        assert_eq!(at(&p.ready), Some(5_505));
        assert_eq!(at(&p.first_good), Some(6_005));
        assert_eq!(at(&p.recovered), Some(6_005));
        assert_eq!(p.detected.as_ref().unwrap().error_ns, 101 * MS);
        assert!(notes.contains_key("masked"), "{notes:?}");
        assert_eq!(per.len(), 2);
        let d = durations(&f, &p);
        assert_eq!(d.detect, Some(0.0));
        assert!((d.cold_start.unwrap() - 3.505).abs() < 1e-9);
        assert!((d.load.unwrap() - 3.0).abs() < 1e-9);
        assert!((d.warm_up.unwrap() - 0.505).abs() < 1e-9);
        assert!((d.first_good_after_ready.unwrap() - 0.5).abs() < 1e-9);
        assert!((d.total.unwrap() - 5.005).abs() < 1e-9);
    }

    #[test]
    fn a_lucky_answer_in_the_middle_of_the_outage_is_not_the_first_good_one() {
        let mut s = series(0, 100, 1_000, 4_000, 8_000);
        s[25].ok = true; // one retry that got through at 2.5 s
        let probes = [info(0, "chat", Some(ProbeRole::Generation))];
        let (p, _, _) = fault_phases(&s, &probes, 0, &times(1_000, Some(1_001)), &[]);
        assert_eq!(p.first_good.as_ref().map(|m| m.t_ns / MS), Some(4_005));
        // Its error bar counts the answer's time too.
        assert_eq!(p.first_good.as_ref().unwrap().error_ns, 106 * MS);
    }

    #[test]
    fn masked_is_passes_while_the_fault_is_still_active() {
        // Paused 1000..5000 ms; the service routes around it from 1500.
        let s = series(0, 100, 1_000, 1_500, 8_000);
        let probes = [info(0, "chat", None)];
        let (p, _, notes) = fault_phases(&s, &probes, 0, &times(1_000, Some(5_000)), &[]);
        assert_eq!(p.masked.as_ref().map(|m| m.t_ns / MS), Some(1_505));
        assert!(notes.contains_key("replaced"));
        assert!(notes.contains_key("ready"));
        // Recovered while still masked: the same point.
        assert_eq!(p.recovered.as_ref().map(|m| m.t_ns / MS), Some(1_505));
        // A kill recovered within its (bookkeeping) duration was not masked.
        let kill = FaultTimes {
            sustained: false,
            ..times(1_000, Some(5_000))
        };
        let (p, _, notes) = fault_phases(&s, &probes, 0, &kill, &[]);
        assert_eq!(p.masked, None);
        assert!(notes["masked"].contains("at once"), "{notes:?}");
    }

    #[test]
    fn an_undisrupted_probe_has_no_phases_and_says_so() {
        let s = series(0, 100, 0, 0, 3_000);
        let probes = [info(0, "chat", Some(ProbeRole::Generation))];
        let (p, _, notes) = fault_phases(&s, &probes, 0, &times(1_000, Some(2_000)), &[]);
        assert_eq!(p.observed().count(), 0);
        assert!(notes["detected"].contains("never failed"), "{notes:?}");
        let m = phase_mark(Phase::Detected, &times(1_000, None), &p, &notes);
        assert!(m.unwrap_err().contains("never failed"));
        let m = phase_mark(Phase::Inject, &times(1_000, None), &p, &notes).unwrap();
        assert_eq!(m.t_ns, 1_000 * MS);
    }

    #[test]
    fn a_lying_health_probe_is_measured_against_the_truth() {
        // Generations fail 2000..7000; health passes throughout (it lies for 5 s),
        // then fails 8000..9000 while generations pass (a false alarm of 1 s).
        let mut s = series(0, 100, 2_000, 7_000, 10_000);
        s.extend(series(1, 100, 8_000, 9_000, 10_000));
        let (lying, alarm, periods) = health_truth(&s, 1, 0, 0, 10_000 * MS).unwrap();
        assert_eq!(lying, 5_000 * MS);
        assert_eq!(alarm, 1_000 * MS);
        assert_eq!(periods, 1);
        // An honest health probe (fails with the generations) never lies.
        let mut s = series(0, 100, 2_000, 7_000, 10_000);
        s.extend(series(1, 100, 2_000, 7_000, 10_000));
        assert_eq!(health_truth(&s, 1, 0, 0, 10_000 * MS), Some((0, 0, 0)));
        assert_eq!(health_truth(&s, 1, 5, 0, 10_000 * MS), None);
    }

    #[test]
    fn a_tolerance_keeps_isolated_failures_out_of_the_outage() {
        // Isolated single failures at 1.2 s and 4.0 s, no outage.
        let mut s = series(0, 100, 0, 0, 10_000);
        s[12].ok = false;
        s[40].ok = false;
        let w = evaluate::window(&s, 0, 1_000 * MS, u64::MAX);
        let tol = Some(Tolerance {
            failures: 1,
            within_ns: 2_000 * MS,
        });
        let r = evaluate::recovery_with(&w, 3, tol);
        assert_eq!(r.detect_ns, None);
        assert_eq!(r.isolated, vec![1_200 * MS, 4_000 * MS]);
        // Without the tolerance the straggler at 4.0 s decides the RTO.
        let r = evaluate::recovery_with(&w, 3, None);
        assert_eq!(r.recovered_ns, Some(4_105 * MS));
        // Two failures within the window are an outage; the later isolated one
        // does not move the recovery.
        s[13].ok = false;
        let w = evaluate::window(&s, 0, 1_000 * MS, u64::MAX);
        let r = evaluate::recovery_with(&w, 3, tol);
        assert_eq!(r.detect_ns, Some(1_200 * MS));
        assert_eq!(r.recovered_ns, Some(1_405 * MS));
        assert_eq!(r.isolated, vec![4_000 * MS]);
    }
}
