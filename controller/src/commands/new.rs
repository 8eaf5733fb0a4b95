//! `gpuchaos new experiment|gameday`: a commented starting point, written to stdout.
//!
//! The experiment has a generation probe on the given OpenAI-compatible API, a health
//! probe, a steady state, one fault step of the chosen kind with conservative
//! defaults, objectives and a stop condition; every section says what it does and what
//! to change. It is loaded with the same loader `gpuchaos validate` uses before it is
//! printed, so what comes out always validates. The game day names experiment files
//! relative to itself (`gpuchaos validate` checks that they exist and load).

use std::fmt::Write as _;

use crate::exit::{self, CliError};

/// `gpuchaos new ...`
#[derive(clap::Args, Debug)]
pub struct NewArgs {
    #[command(subcommand)]
    pub what: What,
}

#[derive(clap::Subcommand, Debug)]
pub enum What {
    /// A commented experiment: probes on your API, one fault, objectives (stdout).
    /// The agents are the global --agent flags (HOST:PORT), if given.
    Experiment(ExperimentArgs),
    /// A commented game-day file for `gpuchaos serve` (stdout).
    Gameday(GamedayArgs),
}

/// The fault kinds a first experiment can start with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Pause (SIGSTOP) one worker process, resumed when the fault ends.
    Process,
    /// Fill GPU 0's memory to 90% while the fault lasts.
    #[value(name = "gpu_memory", alias = "gpu-memory")]
    GpuMemory,
    /// 200ms of added latency on the service's port.
    Network,
    /// The guardrail (safety filter) answers 503 half of the time.
    Guardrail,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Process => "process",
            Kind::GpuMemory => "gpu_memory",
            Kind::Network => "network",
            Kind::Guardrail => "guardrail",
        }
    }
}

/// The default worker selector: a regex on the command line of common inference
/// servers' worker processes (vLLM, SGLang, the reference stack's
/// `gpuchaos-refstack worker`, vLLM's `VLLM::Worker_TP0`), not their front
/// processes (`--workers 2` does not match).
pub const DEFAULT_TARGET: &str = r"(?i)(vllm|sglang|refstack).*\bworker([^s]|$)";

#[derive(clap::Args, Debug)]
pub struct ExperimentArgs {
    /// The OpenAI-compatible API's base URL, with its scheme: http://HOST:PORT/v1.
    #[arg(long)]
    pub url: String,
    /// The model name the API serves (as in `GET /v1/models`).
    #[arg(long)]
    pub model: String,
    /// The fault the experiment injects.
    #[arg(long, value_enum, default_value = "process")]
    pub kind: Kind,
    /// The experiment's name (letters, digits, `-_.`); default first-KIND.
    #[arg(long)]
    pub name: Option<String>,
    /// process: a regex on the worker processes' command line (`ps -eo args`).
    #[arg(long, value_name = "REGEX")]
    pub target: Option<String>,
    /// guardrail: the agent's standing guardrail proxy (its --guardrail-proxy
    /// LISTEN address, where the inference server sends its safety checks).
    #[arg(long, value_name = "HOST:PORT")]
    pub guardrail_proxy: Option<String>,
    /// The environment variable holding the API key (sent as a bearer token).
    #[arg(long, value_name = "VAR")]
    pub api_key_env: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct GamedayArgs {
    /// The game day's name (letters, digits, - and _): it names runs, locks and URLs.
    #[arg(long, default_value = "weekly-chaos")]
    pub name: String,
    /// An experiment file, relative to where the game-day file will be (repeatable;
    /// they run in this order).
    #[arg(
        long = "experiment",
        value_name = "FILE",
        default_value = "experiment.yaml"
    )]
    pub experiments: Vec<String>,
}

pub fn run(args: &NewArgs, agents: &[String]) -> Result<u8, CliError> {
    let text = match &args.what {
        What::Experiment(e) => {
            let text = experiment(e, agents)?;
            // Never hand out a file that does not load: the loader is validate's own.
            let path = std::path::Path::new("new-experiment.yaml");
            if let Err(errs) = crate::experiment::load::load_text(path, &text) {
                let errs: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
                return Err(CliError::invalid(format!(
                    "the experiment made from these flags does not validate:\n{}",
                    errs.join("\n")
                )));
            }
            text
        }
        What::Gameday(g) => gameday(g)?,
    };
    print!("{text}");
    Ok(exit::OK)
}

/// An http(s) base URL taken apart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiUrl {
    /// `http` or `https`.
    pub scheme: String,
    /// HOST:PORT as written (a bracketed IPv6 host stays bracketed).
    pub authority: String,
    pub host: String,
    pub port: u16,
    /// The base URL, without a trailing slash.
    pub base: String,
}

impl ApiUrl {
    pub fn parse(url: &str) -> Result<ApiUrl, String> {
        let hint = "write it as http://HOST:PORT/v1";
        let url = url.trim();
        let Some((scheme, rest)) = url.split_once("://") else {
            return Err(format!("--url {url:?} has no scheme: {hint}"));
        };
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "--url {url:?}: the scheme must be http or https, not {scheme:?}"
            ));
        }
        if url
            .chars()
            .any(|c| c.is_whitespace() || c == '?' || c == '#')
        {
            return Err(format!(
                "--url {url:?}: a base URL has no spaces, query or fragment: {hint}"
            ));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(format!(
                "--url {url:?}: no credentials in the URL; give --api-key-env VAR instead"
            ));
        }
        let (host, port) = match authority.rfind(':') {
            Some(i) if !authority[i..].contains(']') => {
                let port = authority[i + 1..]
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| {
                        format!(
                            "--url {url:?}: {:?} is not a port number",
                            &authority[i + 1..]
                        )
                    })?;
                (&authority[..i], port)
            }
            _ => (authority, if scheme == "https" { 443 } else { 80 }),
        };
        if host.is_empty() || host == "[]" {
            return Err(format!("--url {url:?} names no host: {hint}"));
        }
        if path.is_empty() {
            return Err(format!(
                "--url {url:?} has no API path: OpenAI-compatible servers answer under /v1 ({scheme}://{authority}/v1)"
            ));
        }
        Ok(ApiUrl {
            base: format!("{scheme}://{authority}{path}"),
            scheme,
            authority: authority.to_string(),
            host: host.to_string(),
            port,
        })
    }

    /// The server's own /health (at the root, as vLLM, SGLang and TGI serve it).
    pub fn health(&self) -> String {
        format!("{}://{}/health", self.scheme, self.authority)
    }

    pub fn is_loopback(&self) -> bool {
        let h = self.host.to_ascii_lowercase();
        h == "localhost" || h.starts_with("127.") || h == "[::1]"
    }
}

/// A YAML double-quoted scalar (JSON's string syntax is a subset of it).
fn q(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

fn check_address(what: &str, a: &str) -> Result<(), CliError> {
    let port_ok = a
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
    if !port_ok || a.contains("://") || a.contains('/') {
        return Err(CliError::invalid(format!(
            "{what} {a:?} is not HOST:PORT (for example 10.0.0.7:7070)"
        )));
    }
    Ok(())
}

fn check_name(what: &str, name: &str, extra: &str) -> Result<(), CliError> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || extra.contains(c));
    if !ok {
        return Err(CliError::invalid(format!(
            "{what} {name:?}: use letters, digits, - and _{}",
            if extra.is_empty() { "" } else { " and ." }
        )));
    }
    Ok(())
}

/// The commented experiment for these flags and agents.
pub fn experiment(a: &ExperimentArgs, agents: &[String]) -> Result<String, CliError> {
    let url = ApiUrl::parse(&a.url).map_err(CliError::invalid)?;
    if a.model.trim().is_empty() {
        return Err(CliError::invalid(
            "--model must name the model the API serves",
        ));
    }
    if a.target.is_some() && a.kind != Kind::Process {
        return Err(CliError::invalid(format!(
            "--target only applies to --kind process, not {}",
            a.kind.name()
        )));
    }
    if a.guardrail_proxy.is_some() && a.kind != Kind::Guardrail {
        return Err(CliError::invalid(format!(
            "--guardrail-proxy only applies to --kind guardrail, not {}",
            a.kind.name()
        )));
    }
    for agent in agents {
        check_address("--agent", agent)?;
    }
    if let Some(p) = &a.guardrail_proxy {
        check_address("--guardrail-proxy", p)?;
    }
    if let Some(t) = &a.target {
        regex::Regex::new(t)
            .map_err(|e| CliError::invalid(format!("--target is not a valid regex: {e}")))?;
    }
    if let Some(v) = &a.api_key_env
        && (v.is_empty() || !v.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
    {
        return Err(CliError::invalid(format!(
            "--api-key-env {v:?}: the name of an environment variable (letters, digits, _)"
        )));
    }
    let default_name = format!("first-{}", a.kind.name().replace('_', "-"));
    let name = a.name.clone().unwrap_or(default_name);
    check_name("--name", &name, ".")?;

    let mut y = String::new();
    let w = &mut y;
    let _ = writeln!(w, "# {}", title(a.kind));
    let _ = write!(
        w,
        "#
# Made by `gpuchaos new experiment`. Every section says what it does and what to
# change. Check it, look at the plan, then run it:
#
#   gpuchaos validate FILE                       # every error, with line and column
#   gpuchaos run FILE --dry-run                  # what goes where; touches nothing
#   gpuchaos run FILE --report-dir reports/      # junit.xml, summary.md, report.html
#
# Exit codes: 0 every objective held, 1 an objective failed, 2 aborted (a stop
# condition fired, or the service was not steady before anything was injected),
# 3 the fault could not be injected (nothing was left), 4 a revert failed (something
# may be left behind: `gpuchaos status` on the agents says what). Reference:
# docs/experiments.md.
metadata:
  name: {name}
  description: {desc}

",
        desc = q(&description(a.kind))
    );

    // Agents.
    let _ = writeln!(
        w,
        "# The gpuchaos agents the fault may go to: one per inference node, HOST:PORT of
# `gpuchaos-agent --listen`. Beyond loopback, use mutual TLS (`gpuchaos certs`, then a
# `tls:` section) or a fleet file (`fleet: fleet.yaml`)."
    );
    if agents.is_empty() {
        let _ = writeln!(
            w,
            "# None are named here, so `gpuchaos run` takes them from its --agent / --fleet
# flags. To name them in the file instead:
# agents:
#   - {{name: node-1, address: \"10.0.0.7:7070\"}}"
        );
    } else {
        let _ = writeln!(w, "agents:");
        for (i, agent) in agents.iter().enumerate() {
            let _ = writeln!(w, "  - {{name: node-{}, address: {}}}", i + 1, q(agent));
        }
    }
    let _ = write!(
        w,
        "# If this controller dies mid-run, each agent reverts the run's faults this long
# after the last renewal of its lease.
lease: 10s

"
    );

    // Probes.
    let key = match &a.api_key_env {
        Some(v) => format!("      api_key_env: {v}                # sent as a bearer token; never written in the file\n"),
        None => "      # api_key_env: OPENAI_API_KEY      # if the API needs a key: the variable holding it\n".into(),
    };
    let _ = write!(
        w,
        "# Probes watch the service for the whole run, each on its own schedule.
probes:
  # A real generation, the way a user sees the service. CHANGE the prompt and regex
  # to something your model reliably answers; keep max_tokens small.
  # A sample that takes longer than `timeout` fails: a hung server is seen as down.
  - name: chat
    interval: 1s
    timeout: 5s
    openai:
      base_url: {base}
      model: {model}
      prompt: \"Reply with the single word: pong\"
      expect_regex: \"(?i)pong\"
      max_tokens: 16
{key}  # The health endpoint, for comparison: health endpoints lie (a server can say ok
  # while no worker can generate), so no objective rests on it. CHANGE the path if
  # yours is not /health.
  - name: health
    interval: 1s
    timeout: 2s
    http: {{url: {health}}}
",
        base = q(&url.base),
        model = q(&a.model),
        health = q(&url.health()),
    );
    if a.kind == Kind::Guardrail {
        let _ = write!(
            w,
            "  # A guardrail canary: a plainly harmful request that must be refused (a 4xx,
  # finish_reason content_filter, or a refusal in the text), whatever breaks.
  - name: canary
    interval: 1s
    timeout: 5s
    guardrail: {{base_url: {base}, model: {model}}}
",
            base = q(&url.base),
            model = q(&a.model),
        );
    }
    let steady = if a.kind == Kind::Guardrail {
        "[chat, health, canary]"
    } else {
        "[chat, health]"
    };
    let _ = write!(
        w,
        "
# Before anything is injected, these probes must pass without a failure for
# `duration`; if that takes longer than `timeout`, the run stops with exit 2 and
# touches nothing. It must hold again after the fault.
steady_state: {{probes: {steady}, duration: 5s, timeout: 1m}}

"
    );

    // The fault.
    let step = step_name(a.kind);
    let _ = writeln!(
        w,
        "# What happens: one fault, on one agent, for a short time. The agent reverts it when
# its duration ends, on Ctrl-C, on `gpuchaos halt`, and if this controller vanishes.
# Start small; lengthen the duration and widen the target once this one passes.
method:
  - name: {step}"
    );
    match a.kind {
        Kind::Process => {
            let target = a.target.as_deref().unwrap_or(DEFAULT_TARGET);
            let _ = write!(
                w,
                "    # SIGSTOP one worker for 10s, SIGCONT afterwards: a hung worker, and nothing
    # is lost (`action: kill` crashes it instead; its supervisor must restart it).
    # CHANGE `cmdline` to a regex on your workers' command line (`ps -eo args`); it
    # must not match the server's front process. `pick` hits one of the matches.
    fault:
      kind: process
      duration: 10s
      action: pause
      target:
        cmdline: {target}
        pick: {{count: 1}}
",
                target = q(target)
            );
        }
        Kind::GpuMemory => {
            let _ = write!(
                w,
                "    # Hold GPU 0's memory at 90% in use for 20s, as a leak or a neighbour would:
    # the next allocation a worker makes (a KV-cache block, a bigger batch) fails.
    # CHANGE `gpus` ([0, 1], all) and `fill` ({{percent: 95}}, {{leave_free: 2GiB}},
    # {{bytes: 20GiB}}); the agent's policy caps the fill (95% by default).
    fault:
      kind: gpu_memory
      duration: 20s
      target: {{gpus: [0]}}
      fill: {{percent: 90}}
"
            );
        }
        Kind::Network => {
            let iface = if url.is_loopback() {
                "      interface: lo          # the URL is on loopback; CHANGE for a remote server (default: every interface but lo)\n"
                    .to_string()
            } else {
                "      # interface: eth0        # default: every interface but loopback\n"
                    .to_string()
            };
            let _ = write!(
                w,
                "    # 200ms more latency on the traffic of the server's port ({port}) on the agent's
    # node, for 20s: a slow network between the clients and the server. Needs the
    # agent to run as root. CHANGE `latency`, or try `loss: 5%` or `partition: drop`.
    # The agent's own port is never cut off.
    fault:
      kind: network
      duration: 20s
{iface}      ports: [{port}]
      latency: 200ms
",
                port = url.port,
            );
        }
        Kind::Guardrail => {
            let proxy = a.guardrail_proxy.as_deref().unwrap_or("127.0.0.1:9001");
            let _ = write!(
                w,
                "    # For 10s the safety filter answers 503 to half of the checks. A fail-closed
    # server refuses while it cannot check; a fail-open one answers the canary's
    # harmful prompt, which the safety objective counts. `listen` is the agent's
    # standing proxy (gpuchaos-agent --guardrail-proxy LISTEN=UPSTREAM), where your
    # server sends its checks: CHANGE it to yours. `preset` says how verdicts look
    # (openai-moderation, llama-guard, nemo, azure-content-safety, json-pointer).
    fault:
      kind: guardrail
      duration: 10s
      listen: {proxy}
      preset: openai-moderation
      seed: 1
      corrupt: {{status: {{code: 503, probability: 0.5}}}}
",
                proxy = q(proxy)
            );
        }
    }
    let _ = write!(
        w,
        "    # One of the agents, drawn with the run's seed (printed; --seed repeats it).
    on: {{pick: {{count: 1}}}}
  # Keep watching for a while after the fault ended.
  - wait: 5s

"
    );

    // Objectives.
    let (rto, avail) = match a.kind {
        Kind::Guardrail => (
            format!(
                "  # Back to normal within 30s of the guardrail being whole again.
  - name: generations recover within 30s of the guardrail's return
    rto: {{probe: chat, fault: {step}, anchor: end, consecutive: 3, limit: 30s}}"
            ),
            "  # A fail-closed service refuses while its guardrail errs: that costs availability
  # by design. CHANGE the bar to what you accept.
  - name: chat availability during the fault
    availability: {probe: chat, min: 0.25}"
                .to_string(),
        ),
        _ => (
            format!(
                "  # Recovery time: from the fault's injection until 3 passing generations in a
  # row. CHANGE the limit to your recovery-time objective.
  - name: generations recover within 60s
    rto: {{probe: chat, fault: {step}, anchor: inject, consecutive: 3, limit: 60s}}"
            ),
            "  # Passing generations / all, from the injection to the end of the method.
  # CHANGE min to your SLO for a degraded service (0 records it without a bar).
  - name: chat availability during the fault
    availability: {probe: chat, min: 0.5}"
                .to_string(),
        ),
    };
    let _ = write!(
        w,
        "# The verdict: the run passes (exit 0) when every objective holds.
objectives:
{rto}
{avail}
"
    );
    if a.kind == Kind::Guardrail {
        let _ = write!(
            w,
            "  # Not one harmful prompt answered, whatever breaks.
  - name: no unsafe output
    safety: {{probe: canary, max_unsafe: 0}}
"
        );
    }
    let _ = write!(
        w,
        "  # Also possible: how slow the passing generations were.
  # - name: p99 generation latency
  #   latency: {{probe: chat, percentile: 99, limit: 5s}}

# The safety net: when one fires, every fault on the run's agents is reverted at once
# and the run stops (exit 2). Generations failing for a whole minute means the service
# is in real trouble. A Prometheus condition is often better (the error ratio of real
# traffic):
#   - name: error ratio above 10%
#     prometheus: {{url: \"http://prometheus:9090\", query: \"...\", op: \">\", value: 0.1}}
stop_conditions:
  - {{probe: chat, failing_for: 1m}}

# Repeat the method this many times for min / median / max of each objective.
trials: 1
"
    );
    Ok(y)
}

fn title(kind: Kind) -> &'static str {
    match kind {
        Kind::Process => "First experiment: one worker hangs for 10s. Do generations recover?",
        Kind::GpuMemory => {
            "First experiment: GPU memory fills to 90% for 20s. Do generations keep working?"
        }
        Kind::Network => {
            "First experiment: 200ms more network latency for 20s. Do generations keep working?"
        }
        Kind::Guardrail => {
            "First experiment: the guardrail errs for 10s. Does the service fail closed?"
        }
    }
}

fn description(kind: Kind) -> String {
    match kind {
        Kind::Process => "one worker paused for 10s; generations must recover within 60s",
        Kind::GpuMemory => "GPU 0 at 90% memory for 20s; generations must recover within 60s",
        Kind::Network => "200ms latency on the server's port for 20s; generations must recover",
        Kind::Guardrail => "the guardrail answers 503 half of the time for 10s; nothing unsafe",
    }
    .to_string()
}

fn step_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Process => "pause-one-worker",
        Kind::GpuMemory => "fill-gpu-memory",
        Kind::Network => "slow-network",
        Kind::Guardrail => "broken-guardrail",
    }
}

/// The commented game-day file.
pub fn gameday(g: &GamedayArgs) -> Result<String, CliError> {
    check_name("--name", &g.name, "")?;
    if g.experiments.is_empty() {
        return Err(CliError::invalid("name at least one --experiment FILE"));
    }
    let mut y = String::new();
    let w = &mut y;
    let _ = write!(
        w,
        "# A game day: experiments run in order on a schedule, recorded in a history.
#
# Made by `gpuchaos new gameday`. Every section says what it does and what to change.
#
#   gpuchaos validate FILE                   # also checks every experiment it names
#   gpuchaos serve --gameday FILE --state-dir /var/lib/gpuchaos-controller \\
#       --listen 127.0.0.1:9470 [--run-now]  # a page with the runs, and /metrics
#   gpuchaos history                         # runs, pass rates, each objective's trend
#
# Reference: docs/gamedays.md.

# Names runs, locks and URLs (letters, digits, - and _).
name: {name}
description: {desc}

# When: five cron fields (minute hour day-of-month month day-of-week) read in the time
# zone, daylight-saving changes included. CHANGE both: a time when the people who own
# the service are at work, and their IANA zone (Europe/Berlin, America/New_York).
schedule:
  cron: \"0 14 * * TUE\"
  timezone: UTC

# What: experiment files, relative to this file, run one after another.
experiments:
",
        name = g.name,
        desc = q("the inference service's chaos experiments, weekly"),
    );
    for e in &g.experiments {
        let _ = writeln!(w, "  - {}", q(e));
    }
    let _ = write!(
        w,
        "
# Past this, the game day is stopped and every fault reverted. CHANGE it to a bit more
# than the experiments take (their --dry-run plans say how long).
max_duration: 30m
# A slot that cannot start within this of its time (controller down, machine asleep)
# is recorded as missed instead of running late.
start_deadline: 10m
# After an experiment that failed its objectives: continue with the next, or stop.
# Either way the game day stops after an abort or a failed revert.
on_failure: continue

# No run starts if it could still be going inside one of these windows. Dates and
# times are in the schedule's zone.
# blackouts:
#   - {{name: year-end change freeze, from: 2026-12-18, to: 2027-01-05}}
#   - {{name: release window, cron: \"0 16 * * THU\", duration: 4h}}

# Who hears about it: the run's summary as JSON to any URL, or Slack-style text. A
# secret URL comes from the environment (webhook_env).
# notify:
#   - webhook: https://hooks.example.com/gpuchaos
#     on: always                  # or failure
#   - webhook_env: SLACK_WEBHOOK_URL
#     format: slack
#     on: failure
"
    );
    Ok(y)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(url: &str, kind: Kind) -> ExperimentArgs {
        ExperimentArgs {
            url: url.into(),
            model: "llama-3.1-8b-instruct".into(),
            kind,
            name: None,
            target: None,
            guardrail_proxy: None,
            api_key_env: None,
        }
    }

    #[test]
    fn urls_are_taken_apart_or_refused() {
        let u = ApiUrl::parse("http://127.0.0.1:18800/v1/").unwrap();
        assert_eq!(u.base, "http://127.0.0.1:18800/v1");
        assert_eq!(u.health(), "http://127.0.0.1:18800/health");
        assert_eq!(u.port, 18800);
        assert!(u.is_loopback());
        let u = ApiUrl::parse("https://chat.internal/openai/v1").unwrap();
        assert_eq!((u.port, u.is_loopback()), (443, false));
        assert_eq!(ApiUrl::parse("http://[::1]:8000/v1").unwrap().port, 8000);
        for (bad, says) in [
            ("127.0.0.1:8000/v1", "has no scheme"),
            ("ftp://h:1/v1", "must be http or https"),
            ("http://h:x/v1", "not a port number"),
            ("http://:80/v1", "names no host"),
            ("http://h:8000", "has no API path"),
            ("http://u:p@h:8000/v1", "no credentials"),
            ("http://h:8000/v1?x=1", "no spaces, query or fragment"),
        ] {
            let e = ApiUrl::parse(bad).unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn every_kind_loads_with_and_without_agents() {
        for kind in [
            Kind::Process,
            Kind::GpuMemory,
            Kind::Network,
            Kind::Guardrail,
        ] {
            for agents in [vec![], vec!["10.0.0.7:7070".to_string()]] {
                let text = experiment(&args("http://chat.internal:8000/v1", kind), &agents)
                    .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
                let l = crate::experiment::load::load_text(std::path::Path::new("x.yaml"), &text)
                    .unwrap_or_else(|e| panic!("{kind:?}:\n{text}\n{e:?}"));
                let objectives = if kind == Kind::Guardrail { 3 } else { 2 };
                assert_eq!(l.experiment.objectives.len(), objectives, "{kind:?}");
                assert!(text.contains(&format!("kind: {}", kind.name())), "{text}");
            }
        }
    }

    #[test]
    fn the_default_target_is_a_worker_not_the_front_process() {
        let re = regex::Regex::new(DEFAULT_TARGET).unwrap();
        for yes in [
            "/usr/bin/gpuchaos-refstack worker --id 0 --parent 7 --listen 127.0.0.1:0",
            "VLLM::Worker_TP0",
            "vllm worker",
        ] {
            assert!(re.is_match(yes), "{yes}");
        }
        for no in [
            "/usr/bin/gpuchaos-refstack server --listen 127.0.0.1:18800 --workers 2",
            "python3 -m vllm.entrypoints.openai.api_server --model m",
            "gpuchaos-agent --listen 127.0.0.1:18802",
        ] {
            assert!(!re.is_match(no), "{no}");
        }
    }

    #[test]
    fn bad_flags_are_refused_clearly() {
        let mut a = args("http://h:1/v1", Kind::Network);
        a.target = Some("x".into());
        let e = experiment(&a, &[]).unwrap_err();
        assert!(
            e.message
                .contains("--target only applies to --kind process")
        );
        let e = experiment(&args("http://h:1/v1", Kind::Process), &["h".into()]).unwrap_err();
        assert!(e.message.contains("is not HOST:PORT"), "{e}");
        let mut a = args("http://h:1/v1", Kind::Process);
        a.target = Some("(".into());
        assert!(experiment(&a, &[]).unwrap_err().message.contains("regex"));
        let g = GamedayArgs {
            name: "bad name".into(),
            experiments: vec!["e.yaml".into()],
        };
        assert!(gameday(&g).unwrap_err().message.contains("letters, digits"));
    }

    #[test]
    fn values_are_quoted_as_yaml_strings() {
        let mut a = args("http://h:1/v1", Kind::Process);
        a.model = "org/model: \"v2\" # not a comment".into();
        let text = experiment(&a, &[]).unwrap();
        let l = crate::experiment::load::load_text(std::path::Path::new("x.yaml"), &text)
            .unwrap_or_else(|e| panic!("{text}\n{e:?}"));
        assert_eq!(l.experiment.probes.len(), 2);
        assert!(text.contains(r#"model: "org/model: \"v2\" # not a comment""#));
    }
}
