//! Which agents to talk to, and how: `--agent ADDR` (repeatable) or a fleet file.
//!
//! ```yaml
//! agents:
//!   - name: gpu-node-1
//!     address: 10.0.0.7:7070
//!     labels: {zone: a, pool: h100}
//! tls:                      # paths relative to this file
//!   ca: certs/ca.pem
//!   cert: certs/controller.pem
//!   key: certs/controller-key.pem
//!   server_name: gpuchaos-agent   # optional: the name in the agents' certificates
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gpuchaos_proto::pb::agent_client::AgentClient;
use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::exit::CliError;

/// The default agent when none is named.
pub const DEFAULT_AGENT: &str = "127.0.0.1:7070";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentRef {
    #[serde(default)]
    pub name: String,
    pub address: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl AgentRef {
    pub fn display(&self) -> String {
        if self.name.is_empty() || self.name == self.address {
            self.address.clone()
        } else {
            format!("{} ({})", self.name, self.address)
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsClient {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    #[serde(default)]
    pub server_name: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetFile {
    pub agents: Vec<AgentRef>,
    #[serde(default)]
    pub tls: Option<TlsClient>,
}

#[derive(Debug, Clone)]
pub struct Fleet {
    pub agents: Vec<AgentRef>,
    pub tls: Option<TlsClient>,
    pub timeout: Duration,
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

impl Fleet {
    /// Builds the fleet from the global flags. `--agent` and `--fleet` add up; with
    /// neither, the local agent on 127.0.0.1:7070.
    pub fn from_flags(
        agents: &[String],
        fleet: Option<&Path>,
        tls: Option<TlsClient>,
        timeout: Duration,
    ) -> Result<Fleet, CliError> {
        let mut out = Vec::new();
        let mut file_tls = None;
        if let Some(path) = fleet {
            let text = gpuchaos_proto::files::read_text_capped(
                path,
                gpuchaos_proto::files::MAX_YAML_BYTES,
            )
            .map_err(|e| CliError::invalid(format!("fleet file: {e}")))?;
            let f: FleetFile = serde_saphyr::from_str(&text).map_err(|e| {
                CliError::invalid(format!(
                    "{}: {}",
                    path.display(),
                    gpuchaos_proto::spec::yaml_error(e)
                ))
            })?;
            if f.agents.is_empty() {
                return Err(CliError::invalid(format!(
                    "{}: agents: the list is empty",
                    path.display()
                )));
            }
            let base = path.parent().unwrap_or(Path::new("."));
            file_tls = f.tls.map(|t| TlsClient {
                ca: resolve(base, &t.ca),
                cert: resolve(base, &t.cert),
                key: resolve(base, &t.key),
                server_name: t.server_name,
            });
            out.extend(f.agents);
        }
        for a in agents {
            out.push(AgentRef {
                name: String::new(),
                address: a.clone(),
                labels: BTreeMap::new(),
            });
        }
        if out.is_empty() {
            out.push(AgentRef {
                name: String::new(),
                address: DEFAULT_AGENT.into(),
                labels: BTreeMap::new(),
            });
        }
        for a in &out {
            parse_address(&a.address)?;
        }
        Ok(Fleet {
            agents: out,
            tls: tls.or(file_tls),
            timeout,
        })
    }

    /// Connects to one agent (lazily: the first RPC reports an unreachable agent).
    pub fn client(&self, agent: &AgentRef) -> Result<AgentClient<Channel>, CliError> {
        let (host, uri) = parse_address(&agent.address)?;
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut ep = Endpoint::from_shared(format!("{scheme}://{uri}"))
            .map_err(|e| CliError::invalid(format!("agent address {:?}: {e}", agent.address)))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout.max(Duration::from_secs(30)));
        if let Some(t) = &self.tls {
            let read = |p: &PathBuf, what: &str| {
                gpuchaos_proto::files::read_capped(p, gpuchaos_proto::files::MAX_PEM_BYTES)
                    .map_err(|e| CliError::invalid(format!("the {what}: {e}")))
            };
            let cfg = ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(read(&t.ca, "CA certificate")?))
                .identity(Identity::from_pem(
                    read(&t.cert, "client certificate")?,
                    read(&t.key, "client key")?,
                ))
                .domain_name(t.server_name.clone().unwrap_or(host));
            ep = ep
                .tls_config(cfg)
                .map_err(|e| CliError::invalid(format!("TLS configuration: {e}")))?;
        }
        Ok(AgentClient::new(ep.connect_lazy()))
    }
}

/// Accepts `host:port`, `[v6]:port`, or `http(s)://host:port`; returns the host
/// (for TLS name checks) and `host:port`.
pub fn parse_address(addr: &str) -> Result<(String, String), CliError> {
    let bare = addr
        .strip_prefix("http://")
        .or_else(|| addr.strip_prefix("https://"))
        .unwrap_or(addr)
        .trim_end_matches('/');
    let bad = || {
        CliError::invalid(format!(
            "agent address {addr:?} is not HOST:PORT (for example 127.0.0.1:7070 or gpu-node-1:7070)"
        ))
    };
    let (host, port) = bare.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    Ok((host, bare.to_string()))
}

/// A gRPC failure, said the way an operator can act on it.
pub fn describe_status(agent: &AgentRef, s: &tonic::Status) -> String {
    use tonic::Code;
    let msg = s.message();
    match s.code() {
        Code::Unavailable => {
            let lower = msg.to_lowercase();
            let hint = if lower.contains("certificate")
                || lower.contains("tls")
                || lower.contains("handshake")
            {
                "the TLS handshake failed: check --tls-ca/--tls-cert/--tls-key against the agent's certificates"
            } else {
                "is gpuchaos-agent running there, and reachable?"
            };
            format!("agent {} unreachable ({msg}): {hint}", agent.display())
        }
        Code::DeadlineExceeded => {
            format!("agent {} did not answer in time ({msg})", agent.display())
        }
        _ => format!("agent {}: {msg}", agent.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_address("127.0.0.1:7070").unwrap().1, "127.0.0.1:7070");
        assert_eq!(parse_address("https://node:7070").unwrap().0, "node");
        assert_eq!(parse_address("[::1]:7070").unwrap().0, "::1");
        for bad in ["node", "node:x", ":7070", "node:0", "node:70000"] {
            assert!(parse_address(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn fleet_file_paths_are_relative_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("fleet.yaml");
        std::fs::write(
            &f,
            "agents:\n  - {name: a, address: '127.0.0.1:7070', labels: {zone: x}}\ntls: {ca: c/ca.pem, cert: c/x.pem, key: c/x-key.pem}\n",
        )
        .unwrap();
        let fl = Fleet::from_flags(
            &["127.0.0.1:7071".into()],
            Some(&f),
            None,
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(fl.agents.len(), 2);
        assert_eq!(fl.tls.unwrap().ca, dir.path().join("c/ca.pem"));
        std::fs::write(&f, "agents:\n  - {adress: x}\n").unwrap();
        let e = Fleet::from_flags(&[], Some(&f), None, Duration::from_secs(1)).unwrap_err();
        assert!(e.message.contains("adress"), "{e}");
        let fl = Fleet::from_flags(&[], None, None, Duration::from_secs(1)).unwrap();
        assert_eq!(fl.agents[0].address, DEFAULT_AGENT);
    }
}
