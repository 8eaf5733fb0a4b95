//! `steady_state`: the probes that must hold before each trial and after it.

use gpuchaos_proto::spec::HumanDuration;

use super::probes::ProbeNames;
use super::{Cx, FieldPath};
use crate::experiment::{SteadyState, ValidSteadyState};

pub(super) fn check(s: &SteadyState, names: &ProbeNames, cx: &mut Cx) -> Option<ValidSteadyState> {
    let sp = FieldPath::root().key("steady_state");
    if s.probes.is_empty() {
        cx.error(&sp.key("probes"), "list at least one probe");
    }
    let probes: Vec<Option<usize>> = s
        .probes
        .iter()
        .enumerate()
        .map(|(i, n)| names.resolve(cx, sp.key("probes").index(i), n))
        .collect();
    if s.duration().is_zero() {
        cx.error(&sp.key("duration"), "must be above zero");
    }
    if s.timeout() < s.duration() {
        cx.error(
            &sp.key("timeout"),
            format!(
                "{} is shorter than the duration ({}): the steady state could never be established",
                HumanDuration(s.timeout()),
                HumanDuration(s.duration())
            ),
        );
    }
    Some(ValidSteadyState {
        probes: probes.into_iter().collect::<Option<Vec<usize>>>()?,
        duration: s.duration(),
        timeout: s.timeout(),
    })
}
