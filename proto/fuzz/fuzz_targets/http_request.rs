//! The HTTP request path, coverage-guided: each input is sent as the raw bytes of one
//! connection to a real agent running in this process (`fuzz_api::start_agent`: the
//! `kvbroker dev` setup, a local vault, a policy for this uid, an audit log), after which the
//! client half-closes and reads everything the agent sends.
//!
//! Properties beyond "does not panic": the agent answers or closes within 5 s of the client's
//! half-close (never hangs), every answer it sends is an HTTP/1.1 response that is not a 5xx
//! (an audit failure, a panic turned 500, an upstream error would be one), and it still
//! accepts the next connection.
#![no_main]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;

static SOCKET: OnceLock<PathBuf> = OnceLock::new();

fn socket() -> &'static PathBuf {
    SOCKET.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("kvbroker-fuzz-http-{}", std::process::id()));
        kvbroker_agent::fuzz_api::start_agent(&dir).expect("the agent starts")
    })
}

fuzz_target!(|data: &[u8]| {
    let mut s = UnixStream::connect(socket()).expect("the agent still accepts connections");
    s.set_read_timeout(Some(Duration::from_secs(5))).expect("set a read timeout");
    s.set_write_timeout(Some(Duration::from_secs(5))).expect("set a write timeout");
    // The agent may close before reading everything (a malformed head): EPIPE is fine.
    let _ = s.write_all(data);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    if let Err(e) = s.read_to_end(&mut answer) {
        assert!(
            !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            "the agent neither answered nor closed within 5 s of the half-close"
        );
    }
    // Every response the agent sent, pipelined or not, starts a line with `HTTP/1.1 `.
    let mut at = 0;
    let mut first = true;
    while let Some(i) = find(&answer[at..], b"HTTP/1.1 ") {
        let start = at + i;
        if first {
            assert_eq!(start, 0, "the answer does not start with a status line");
            first = false;
        }
        if start == 0 || answer[..start].ends_with(b"\n") || answer[..start].ends_with(b"}") {
            let status = &answer[start + 9..(start + 12).min(answer.len())];
            assert!(status.first() != Some(&b'5'), "a 5xx answer: {:?}", String::from_utf8_lossy(status));
        }
        at = start + 9;
    }
});

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
