//! `gpuchaos certs --out DIR`: a CA plus agent and controller certificates for mutual
//! TLS. Keys are written with mode 0600; existing files are never overwritten unless
//! `--force` is given.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, date_time_ymd,
};

use crate::exit::{self, CliError};
use crate::output::Output;

pub struct Options<'a> {
    pub out: &'a Path,
    /// Extra names and addresses for the agent certificate.
    pub sans: &'a [String],
    pub days: u32,
    pub force: bool,
    pub output: Output,
}

pub const FILES: &[&str] = &[
    "ca.pem",
    "ca-key.pem",
    "agent.pem",
    "agent-key.pem",
    "controller.pem",
    "controller-key.pem",
];

/// (year, month, day) of a Unix day number (Howard Hinnant's civil_from_days).
fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    ((if m <= 2 { y + 1 } else { y }) as i32, m, d)
}

fn validity(params: &mut CertificateParams, days: u32) {
    let today = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64 / 86_400)
        .unwrap_or(0);
    let (y, m, d) = civil(today - 1);
    params.not_before = date_time_ymd(y, m, d);
    let (y, m, d) = civil(today + days as i64);
    params.not_after = date_time_ymd(y, m, d);
}

fn err(e: rcgen::Error) -> CliError {
    CliError::internal(format!("certificate generation failed: {e}"))
}

fn write(path: &Path, data: &str, mode: u32, force: bool) -> Result<(), CliError> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).mode(mode);
    if force {
        opts.create(true).truncate(true);
    } else {
        opts.create_new(true);
    }
    let mut f = opts.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CliError::invalid(format!(
                "{} already exists: pass --force to replace it",
                path.display()
            ))
        } else {
            CliError::invalid(format!("cannot write {}: {e}", path.display()))
        }
    })?;
    f.write_all(data.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(|e| CliError::internal(format!("writing {}: {e}", path.display())))
}

pub fn run(opts: Options<'_>) -> Result<u8, CliError> {
    if opts.days == 0 {
        return Err(CliError::invalid("--days must be at least 1"));
    }
    std::fs::create_dir_all(opts.out)
        .map_err(|e| CliError::invalid(format!("cannot create {}: {e}", opts.out.display())))?;
    if !opts.force {
        for f in FILES {
            let p = opts.out.join(f);
            if p.exists() {
                return Err(CliError::invalid(format!(
                    "{} already exists: pass --force to replace it",
                    p.display()
                )));
            }
        }
    }

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "gpuchaos CA");
    ca_params.distinguished_name = dn;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca_params, opts.days);
    let ca_key = KeyPair::generate().map_err(err)?;
    let ca_key_pem = ca_key.serialize_pem();
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).map_err(err)?;

    let mut agent_names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
        "gpuchaos-agent".to_string(),
    ];
    for s in opts.sans {
        if !agent_names.contains(s) {
            agent_names.push(s.clone());
        }
    }
    let leaf = |cn: &str,
                names: Vec<String>,
                eku: ExtendedKeyUsagePurpose|
     -> Result<(String, String), CliError> {
        let mut p =
            CertificateParams::new(names).map_err(|e| CliError::invalid(format!("--san: {e}")))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        p.distinguished_name = dn;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![eku];
        validity(&mut p, opts.days);
        let key = KeyPair::generate().map_err(err)?;
        let cert = p.signed_by(&key, &ca).map_err(err)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (agent_pem, agent_key) = leaf(
        "gpuchaos-agent",
        agent_names.clone(),
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (ctl_pem, ctl_key) = leaf(
        "gpuchaos-controller",
        vec!["gpuchaos-controller".to_string()],
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;

    let o = opts.out;
    write(&o.join("ca.pem"), &ca.pem(), 0o644, opts.force)?;
    write(&o.join("ca-key.pem"), &ca_key_pem, 0o600, opts.force)?;
    write(&o.join("agent.pem"), &agent_pem, 0o644, opts.force)?;
    write(&o.join("agent-key.pem"), &agent_key, 0o600, opts.force)?;
    write(&o.join("controller.pem"), &ctl_pem, 0o644, opts.force)?;
    write(&o.join("controller-key.pem"), &ctl_key, 0o600, opts.force)?;
    if opts.output == Output::Json {
        let path = |f: &str| o.join(f).display().to_string();
        let v = serde_json::json!({
            "dir": o.display().to_string(),
            "days": opts.days,
            "agent_names": agent_names,
            "files": {
                "ca": path("ca.pem"),
                "ca_key": path("ca-key.pem"),
                "agent": path("agent.pem"),
                "agent_key": path("agent-key.pem"),
                "controller": path("controller.pem"),
                "controller_key": path("controller-key.pem"),
            },
        });
        println!("{v}");
        return Ok(exit::OK);
    }
    println!(
        "wrote a CA and certificates to {} (valid {} days)",
        o.display(),
        opts.days
    );
    println!("  agent names: {}", agent_names.join(", "));
    println!(
        "  agent:      gpuchaos-agent --listen 0.0.0.0:7070 --tls-cert {0}/agent.pem --tls-key {0}/agent-key.pem --tls-ca {0}/ca.pem",
        o.display()
    );
    println!(
        "  controller: gpuchaos --tls-ca {0}/ca.pem --tls-cert {0}/controller.pem --tls-key {0}/controller-key.pem --agent HOST:7070 status",
        o.display()
    );
    println!("keep ca-key.pem offline: anyone holding it can mint a controller certificate");
    Ok(exit::OK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
    }

    #[test]
    fn writes_all_files_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("certs");
        run(Options {
            out: &out,
            sans: &["node-7".into()],
            days: 30,
            force: false,
            output: Output::Text,
        })
        .unwrap();
        for f in FILES {
            assert!(out.join(f).exists(), "{f}");
        }
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let e = run(Options {
            out: &out,
            sans: &[],
            days: 30,
            force: false,
            output: Output::Text,
        })
        .unwrap_err();
        assert!(e.message.contains("--force"), "{e}");
        run(Options {
            out: &out,
            sans: &[],
            days: 30,
            force: true,
            output: Output::Text,
        })
        .unwrap();
    }
}
