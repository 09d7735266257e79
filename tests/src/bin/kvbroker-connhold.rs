//! `kvbroker-connhold SOCKET COUNT [--request]`: opens COUNT connections to an agent socket
//! (each sending one keep-alive `GET /v1/health` with `--request`) and holds them until its
//! stdin closes. For the tests of connection budgets, run as another uid through `setpriv`.
//!
//! Prints one line, `held N ok M`: connections it holds open (not closed by the agent) and
//! how many of them had their health request answered 200.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test tool: a failure should panic loudly")]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let socket = args.get(1).expect("usage: kvbroker-connhold SOCKET COUNT [--request]");
    let count: usize = args.get(2).and_then(|c| c.parse().ok()).expect("COUNT");
    let request = args.iter().any(|a| a == "--request");
    let mut held = Vec::with_capacity(count);
    let mut ok = 0;
    for _ in 0..count {
        let Ok(mut s) = UnixStream::connect(socket) else { continue };
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        if request {
            if s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: kvbroker\r\n\r\n").is_err() {
                continue;
            }
            let mut buf = [0u8; 4096];
            match s.read(&mut buf) {
                Ok(n) if n > 0 => {
                    if buf[..n].starts_with(b"HTTP/1.1 200") {
                        ok += 1;
                    }
                }
                _ => continue,
            }
        }
        held.push(s);
    }
    // Connections the agent has closed since read as EOF without blocking.
    let mut open = 0;
    for s in &held {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        match (&*s).read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => open += 1,
            _ => {}
        }
    }
    println!("held {open} ok {ok}");
    std::io::stdout().flush().unwrap();
    let mut rest = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut rest);
}
