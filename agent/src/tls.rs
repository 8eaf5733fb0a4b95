//! Transport security: loopback without TLS, anything else only with mutual TLS.

use std::net::SocketAddr;
use std::path::PathBuf;

use tonic::transport::{Certificate, Identity, ServerTlsConfig};

#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub ca: Option<PathBuf>,
}

fn read(p: &std::path::Path, what: &str) -> Result<Vec<u8>, String> {
    gpuchaos_proto::files::read_capped(p, gpuchaos_proto::files::MAX_PEM_BYTES)
        .map_err(|e| format!("the {what}: {e}"))
}

/// Decides the server's TLS: `Ok(None)` for plaintext on loopback.
pub fn server_config(
    listen: SocketAddr,
    files: &TlsFiles,
) -> Result<Option<ServerTlsConfig>, String> {
    match (&files.cert, &files.key, &files.ca) {
        (None, None, None) => {
            if listen.ip().is_loopback() {
                Ok(None)
            } else {
                Err(format!(
                    "refusing to listen on {listen} without mutual TLS: pass --tls-cert, --tls-key and --tls-ca \
                     (`gpuchaos certs --out DIR` makes them), or listen on 127.0.0.1"
                ))
            }
        }
        (Some(cert), Some(key), Some(ca)) => {
            let identity =
                Identity::from_pem(read(cert, "certificate")?, read(key, "private key")?);
            let ca = Certificate::from_pem(read(ca, "CA certificate")?);
            Ok(Some(
                ServerTlsConfig::new()
                    .identity(identity)
                    .client_ca_root(ca)
                    .client_auth_optional(false),
            ))
        }
        _ => Err("mutual TLS needs all three of --tls-cert, --tls-key and --tls-ca".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_needs_tls() {
        let none = TlsFiles::default();
        assert!(
            server_config("127.0.0.1:7070".parse().unwrap(), &none)
                .unwrap()
                .is_none()
        );
        assert!(
            server_config("[::1]:7070".parse().unwrap(), &none)
                .unwrap()
                .is_none()
        );
        let e = server_config("0.0.0.0:7070".parse().unwrap(), &none).unwrap_err();
        assert!(
            e.contains("refusing to listen on 0.0.0.0:7070 without mutual TLS"),
            "{e}"
        );
        let partial = TlsFiles {
            cert: Some("a".into()),
            ..Default::default()
        };
        assert!(
            server_config("127.0.0.1:1".parse().unwrap(), &partial)
                .unwrap_err()
                .contains("all three")
        );
    }
}
