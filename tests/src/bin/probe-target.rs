//! A minimal HTTP/1.1 server for the experiment tests: `probe-target MARKER`.
//!
//! Binds 127.0.0.1:0, prints `port=N`, and answers every request with
//! `200 {"status":"ok"}`, one connection at a time on one thread. Pausing it
//! (SIGSTOP) makes it exactly as unavailable as the pause lasts, which is what the
//! RTO accuracy test needs: a target whose downtime is known.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;

fn main() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    println!("port={port}");
    let _ = std::io::stdout().flush();
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = conn.set_nodelay(true);
        let mut reader = BufReader::new(match conn.try_clone() {
            Ok(c) => c,
            Err(_) => continue,
        });
        // Requests on one connection, until it closes.
        loop {
            let mut length = 0usize;
            let mut line = String::new();
            let mut first = true;
            let mut ok = false;
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                if first {
                    first = false;
                    ok = true;
                }
                let l = line.trim_end();
                if l.is_empty() {
                    break;
                }
                if let Some(v) = l
                    .to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_string())
                {
                    length = v.parse().unwrap_or(0);
                }
            }
            if !ok {
                break;
            }
            let mut body = vec![0u8; length];
            if reader.read_exact(&mut body).is_err() {
                break;
            }
            let resp = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}";
            if conn.write_all(resp).is_err() {
                break;
            }
        }
    }
}
