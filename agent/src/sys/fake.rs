//! Recording fakes of the system interfaces, for the unit tests of the drivers and
//! the manager: a process table in memory, a node without GPUs, and the network
//! tools with nftables in memory.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::errno::Errno;

use super::gpu::GpuQuery;
use super::tools::{CmdError, Tool, ToolFut, Tools};
use super::{ProcStat, Processes};

const SIGCONT: i32 = 18;
const SIGSTOP: i32 = 19;

/// A process table in memory that records every signal and applies its effect.
#[derive(Default)]
pub struct FakeProcs {
    pub table: Mutex<BTreeMap<u32, (ProcStat, String)>>,
    pub signals: Mutex<Vec<(u32, i32)>>,
    /// Signals these pids ignore (SIGSTOP never takes, SIGKILL never kills).
    pub stubborn: Mutex<Vec<u32>>,
    /// Called before each signal takes effect (tests check the journal here).
    #[allow(clippy::type_complexity)]
    pub hook: Mutex<Option<Box<dyn Fn(u32, i32) + Send>>>,
}

impl FakeProcs {
    pub fn add(&self, pid: u32, comm: &str, cmdline: &str) {
        self.table.lock().unwrap().insert(
            pid,
            (
                ProcStat {
                    pid,
                    comm: comm.into(),
                    state: 'S',
                    ppid: 1,
                    flags: 0,
                    start_time: pid as u64 * 10,
                },
                cmdline.into(),
            ),
        );
    }
    pub fn state(&self, pid: u32) -> Option<char> {
        self.table.lock().unwrap().get(&pid).map(|(s, _)| s.state)
    }
}

impl Processes for FakeProcs {
    fn pids(&self) -> io::Result<Vec<u32>> {
        Ok(self.table.lock().unwrap().keys().copied().collect())
    }
    fn stat(&self, pid: u32) -> io::Result<Option<ProcStat>> {
        Ok(self.table.lock().unwrap().get(&pid).map(|(s, _)| s.clone()))
    }
    fn cmdline(&self, pid: u32) -> io::Result<Option<Vec<String>>> {
        Ok(self
            .table
            .lock()
            .unwrap()
            .get(&pid)
            .map(|(_, c)| c.split(' ').map(String::from).collect()))
    }
    fn cgroup(&self, _pid: u32) -> io::Result<Option<String>> {
        Ok(Some("/test.slice".into()))
    }
    fn signal(&self, pid: u32, sig: i32) -> Result<(), Errno> {
        if let Some(h) = self.hook.lock().unwrap().as_ref() {
            h(pid, sig);
        }
        self.signals.lock().unwrap().push((pid, sig));
        if self.stubborn.lock().unwrap().contains(&pid) {
            return Ok(());
        }
        let mut t = self.table.lock().unwrap();
        let Some((s, _)) = t.get_mut(&pid) else {
            return Err(Errno::ESRCH);
        };
        match sig {
            SIGSTOP => s.state = 'T',
            SIGCONT => s.state = 'S',
            _ => {
                t.remove(&pid);
            }
        }
        Ok(())
    }
    fn self_pid(&self) -> u32 {
        4
    }
}

pub struct NoGpus;
impl GpuQuery for NoGpus {
    fn list(&self) -> Result<Vec<crate::sys::gpu::GpuInfo>, String> {
        Err("no NVIDIA driver".into())
    }
    fn processes_on(&self, _: &gpuchaos_proto::spec::GpuRef) -> Result<Vec<u32>, String> {
        Err("no NVIDIA driver".into())
    }
}

/// GPUs whose per-process memory a test sets (`set(gpu, pid, bytes)`), as NVML
/// reports it; each GPU has 80 GiB.
pub struct FakeGpus {
    pub count: u32,
    pub memory: Mutex<BTreeMap<(u32, u32), u64>>,
}

impl FakeGpus {
    pub fn new(count: u32) -> Self {
        FakeGpus {
            count,
            memory: Mutex::new(BTreeMap::new()),
        }
    }
    pub fn set(&self, gpu: u32, pid: u32, bytes: u64) {
        self.memory.lock().unwrap().insert((gpu, pid), bytes);
    }
    fn index(&self, gpu: &gpuchaos_proto::spec::GpuRef) -> Result<u32, String> {
        match gpu {
            gpuchaos_proto::spec::GpuRef::Index(i) if *i < self.count => Ok(*i),
            other => Err(format!("{other} does not exist on this node")),
        }
    }
}

const FAKE_GPU_TOTAL: u64 = 80 << 30;

impl GpuQuery for FakeGpus {
    fn list(&self) -> Result<Vec<crate::sys::gpu::GpuInfo>, String> {
        let memory = self.memory.lock().unwrap();
        Ok((0..self.count)
            .map(|index| {
                let used: u64 = memory
                    .iter()
                    .filter(|((g, _), _)| *g == index)
                    .map(|(_, b)| *b)
                    .sum();
                crate::sys::gpu::GpuInfo {
                    index,
                    uuid: format!("GPU-fake-{index}"),
                    name: "Fake GPU".into(),
                    total: FAKE_GPU_TOTAL,
                    used,
                    free: FAKE_GPU_TOTAL.saturating_sub(used),
                    mig: false,
                    compute_mode: "default".into(),
                }
            })
            .collect())
    }
    fn processes_on(&self, gpu: &gpuchaos_proto::spec::GpuRef) -> Result<Vec<u32>, String> {
        Ok(self
            .process_memory(gpu)?
            .into_iter()
            .map(|(p, _)| p)
            .collect())
    }
    fn process_memory(
        &self,
        gpu: &gpuchaos_proto::spec::GpuRef,
    ) -> Result<Vec<(u32, Option<u64>)>, String> {
        let i = self.index(gpu)?;
        Ok(self
            .memory
            .lock()
            .unwrap()
            .iter()
            .filter(|((g, _), _)| *g == i)
            .map(|((_, pid), b)| (*pid, Some(*b)))
            .collect())
    }
}

/// A node with init, the agent (pid 4), ten vLLM workers (pids 100-109) and sshd.
pub fn workers() -> Arc<FakeProcs> {
    let p = Arc::new(FakeProcs::default());
    p.add(1, "init", "/sbin/init");
    p.add(4, "gpuchaos-agent", "gpuchaos-agent");
    for pid in 100..110 {
        p.add(
            pid,
            "vllm-worker",
            &format!("python -m vllm.worker --rank {}", pid - 100),
        );
    }
    p.add(200, "sshd", "/usr/sbin/sshd -D");
    p
}

/// One tool call, as the network and guardrail drivers made it.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub ns: Option<PathBuf>,
    pub tool: Tool,
    pub args: Vec<String>,
    pub stdin: Option<String>,
}

impl Call {
    /// `nft -j list table inet gpuchaos_…`
    pub fn line(&self) -> String {
        format!("{} {}", self.tool.binary(), self.args.join(" "))
    }
}

/// One nftables table as the fake kernel holds it: its chains, each with its type
/// and its rule count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FakeTable {
    pub chains: Vec<(String, String, usize)>,
}

impl FakeTable {
    pub fn rules(&self) -> usize {
        self.chains.iter().map(|c| c.2).sum()
    }
}

/// The network tools in memory: records every call; nft keeps tables (created by
/// `nft -f` scripts, listed, neutralized, deleted) the way the kernel answers them;
/// tc and ip answer empty lists. `failing` makes calls whose line starts with a
/// prefix fail with a message; `flush_on_create` stands for a firewall manager that
/// empties every new table at once.
#[derive(Default)]
pub struct FakeTools {
    pub calls: Mutex<Vec<Call>>,
    pub tables: Mutex<BTreeMap<(Option<PathBuf>, String), FakeTable>>,
    pub failing: Mutex<Vec<(String, String)>>,
    pub flush_on_create: std::sync::atomic::AtomicBool,
}

fn cmd_error(call: &Call, message: &str) -> CmdError {
    CmdError {
        command: call.line(),
        message: message.to_string(),
    }
}

const NO_SUCH: &str = "Error: No such file or directory";

impl FakeTools {
    pub fn lines(&self) -> Vec<String> {
        self.calls.lock().unwrap().iter().map(Call::line).collect()
    }

    pub fn fail(&self, prefix: &str, message: &str) {
        self.failing
            .lock()
            .unwrap()
            .push((prefix.to_string(), message.to_string()));
    }

    fn nft(&self, call: &Call) -> Result<String, CmdError> {
        let mut tables = self.tables.lock().unwrap();
        let args: Vec<&str> = call.args.iter().map(String::as_str).collect();
        let key = |name: &str| (call.ns.clone(), name.to_string());
        match args.as_slice() {
            ["-f", "-"] => {
                let script = call.stdin.clone().unwrap_or_default();
                self.nft_script(&mut tables, &call.ns, &script)
                    .map_err(|m| cmd_error(call, &m))?;
                Ok(String::new())
            }
            ["-j", "list", "table", "inet", name] => {
                let t = tables
                    .get(&key(name))
                    .ok_or_else(|| cmd_error(call, NO_SUCH))?;
                let mut items =
                    vec![serde_json::json!({"table": {"family": "inet", "name": name}})];
                for (chain, kind, n) in &t.chains {
                    items.push(serde_json::json!({"chain": {"name": chain, "type": kind}}));
                    for _ in 0..*n {
                        items.push(serde_json::json!({"rule": {"chain": chain}}));
                    }
                }
                Ok(serde_json::json!({ "nftables": items }).to_string())
            }
            ["-j", "list", "tables"] => {
                let items: Vec<_> = tables
                    .keys()
                    .filter(|(ns, _)| *ns == call.ns)
                    .map(|(_, n)| serde_json::json!({"table": {"family": "inet", "name": n}}))
                    .collect();
                Ok(serde_json::json!({ "nftables": items }).to_string())
            }
            ["delete", "table", "inet", name] => tables
                .remove(&key(name))
                .map(|_| String::new())
                .ok_or_else(|| cmd_error(call, NO_SUCH)),
            _ => Err(cmd_error(call, "the fake nft does not know this command")),
        }
    }

    /// A table definition, or `insert rule` / `flush chain` lines.
    fn nft_script(
        &self,
        tables: &mut BTreeMap<(Option<PathBuf>, String), FakeTable>,
        ns: &Option<PathBuf>,
        script: &str,
    ) -> Result<(), String> {
        let mut lines = script.lines().map(str::trim).filter(|l| !l.is_empty());
        let Some(first) = lines.next() else {
            return Ok(());
        };
        if let Some(rest) = first.strip_prefix("table inet ") {
            let name = rest.trim_end_matches('{').trim().to_string();
            let mut table = FakeTable::default();
            for l in lines {
                if let Some(c) = l.strip_prefix("chain ") {
                    table
                        .chains
                        .push((c.trim_end_matches('{').trim().into(), String::new(), 0));
                } else if let Some(t) = l.strip_prefix("type ") {
                    let kind = t.split_whitespace().next().unwrap_or_default();
                    if let Some(c) = table.chains.last_mut() {
                        c.1 = kind.to_string();
                    }
                } else if l != "}"
                    && let Some(c) = table.chains.last_mut()
                {
                    c.2 += 1;
                }
            }
            if self
                .flush_on_create
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                for c in &mut table.chains {
                    c.2 = 0;
                }
            }
            tables.insert((ns.clone(), name), table);
            return Ok(());
        }
        for l in std::iter::once(first).chain(lines) {
            let words: Vec<&str> = l.split_whitespace().collect();
            let (table, chain) = match words.as_slice() {
                ["insert", "rule", "inet", t, c, ..] | ["flush", "chain", "inet", t, c] => (*t, *c),
                _ => return Err(format!("the fake nft does not know {l:?}")),
            };
            let t = tables
                .get_mut(&(ns.clone(), table.to_string()))
                .ok_or(NO_SUCH)?;
            let c = t.chains.iter_mut().find(|x| x.0 == chain).ok_or(NO_SUCH)?;
            if words[0] == "insert" {
                c.2 += 1;
            } else {
                c.2 = 0;
            }
        }
        Ok(())
    }
}

impl Tools for FakeTools {
    fn run<'a>(
        &'a self,
        ns: Option<&'a Path>,
        tool: Tool,
        args: &'a [String],
        stdin: Option<&'a str>,
    ) -> ToolFut<'a> {
        let call = Call {
            ns: ns.map(Path::to_path_buf),
            tool,
            args: args.to_vec(),
            stdin: stdin.map(str::to_string),
        };
        self.calls.lock().unwrap().push(call.clone());
        let line = call.line();
        let failed = self
            .failing
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| line.starts_with(p.as_str()))
            .map(|(_, m)| m.clone());
        let r = match (failed, tool) {
            (Some(m), _) => Err(cmd_error(&call, &m)),
            (None, Tool::Nft) => self.nft(&call),
            (None, Tool::Tc | Tool::Ip) if args.first().is_some_and(|a| a == "-j") => {
                Ok("[]".into())
            }
            (None, _) => Ok(String::new()),
        };
        Box::pin(async move { r })
    }
}
