//! `kvbroker-fuzzreq [--count N] [--threads T] [--max-secs S] [--seed X] [--quick]`: starts a
//! real `kvbroker run` agent (the test harness's builder, in a temp dir, loopback Unix socket
//! only) and sends it N mutated HTTP/1.1 requests: random methods, paths, queries, headers,
//! versions, bodies, truncated and oversized heads, byte flips and plain garbage. Then checks
//! that `/v1/health` answers 200 and a valid read still returns the secret, and prints the
//! numbers (requests, time, responses by status class, agent RSS and fds before and after).
//!
//! Defaults: 1,000,000 requests, 16 threads, at most 1,800 s. `--quick`: 20,000 requests, at
//! most 50 s (what `.ci/run` runs). Exits non-zero if the agent died or stopped serving.
//! Secret values are compared, never printed.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "test tool: a failure should panic loudly")]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use kvbroker_tests::{Agent, canary, raw_get};

const SECRETS: &[&str] = &["db-password", "api-key", "Mixed-Case-1"];

struct Opts {
    count: u64,
    threads: u64,
    max_secs: u64,
    seed: u64,
}

fn opts() -> Opts {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut o = Opts { count: 1_000_000, threads: 16, max_secs: 1800, seed: fastrand::u64(..) };
    let mut i = 0;
    while i < args.len() {
        let val = |i: usize| -> u64 {
            args.get(i + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{} needs a number", args[i]))
        };
        match args[i].as_str() {
            "--quick" => {
                o.count = 20_000;
                o.max_secs = 50;
                i += 1;
                continue;
            }
            "--count" => o.count = val(i),
            "--threads" => o.threads = val(i).max(1),
            "--max-secs" => o.max_secs = val(i),
            "--seed" => o.seed = val(i),
            other => panic!("unknown argument {other:?}"),
        }
        i += 2;
    }
    o
}

#[derive(Default)]
struct Counts {
    sent: AtomicU64,
    connections: AtomicU64,
    responses: [AtomicU64; 6], // 1xx..5xx by index 1..=5, [0]: other
    no_answer: AtomicU64,
    /// Complete requests with no byte of answer within 2 s.
    timed_out: AtomicU64,
    connect_failed: AtomicU64,
}

fn main() {
    let o = opts();
    println!(
        "kvbroker-fuzzreq: {} requests, {} threads, at most {} s, seed {}",
        o.count, o.threads, o.max_secs, o.seed
    );
    let values: Vec<String> = SECRETS.iter().map(|s| canary(s)).collect();
    let mut b = Agent::builder("fuzzreq").allow_uid(0);
    for (name, value) in SECRETS.iter().zip(&values) {
        b = b.secret(name, value);
    }
    let mut agent = b.start();
    let pid = agent.proc.pid();
    check_serving(&agent.socket, &values);
    let before = usage(pid);
    println!("agent pid {pid} before: {before}");

    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(o.max_secs);
    let started = Instant::now();
    let per = o.count / o.threads;
    let handles: Vec<_> = (0..o.threads)
        .map(|t| {
            let n = if t == 0 { per + o.count % o.threads } else { per };
            let (socket, counts, stop) = (agent.socket.clone(), Arc::clone(&counts), Arc::clone(&stop));
            let rng = fastrand::Rng::with_seed(o.seed.wrapping_add(t));
            std::thread::spawn(move || worker(&socket, n, rng, &counts, &stop, deadline))
        })
        .collect();
    let progress = {
        let (counts, stop) = (Arc::clone(&counts), Arc::clone(&stop));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_secs(1));
                let s = started.elapsed().as_secs();
                if s > 0 && s.is_multiple_of(30) {
                    eprintln!("  {s} s: {} sent", counts.sent.load(Ordering::Relaxed));
                }
            }
        })
    };
    for h in handles {
        h.join().unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    progress.join().unwrap();
    let elapsed = started.elapsed();

    let c = &counts;
    let sent = c.sent.load(Ordering::Relaxed);
    println!(
        "sent {sent} requests on {} connections in {:.1} s ({:.0} req/s)",
        c.connections.load(Ordering::Relaxed),
        elapsed.as_secs_f64(),
        sent as f64 / elapsed.as_secs_f64()
    );
    let r: Vec<u64> = c.responses.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    println!(
        "responses: 1xx {} 2xx {} 3xx {} 4xx {} 5xx {} other {}; connections with no answer {} (of which complete but silent for 2 s: {}); connect failures {}",
        r[1],
        r[2],
        r[3],
        r[4],
        r[5],
        r[0],
        c.no_answer.load(Ordering::Relaxed),
        c.timed_out.load(Ordering::Relaxed),
        c.connect_failed.load(Ordering::Relaxed)
    );
    let alive = agent.proc.wait_timeout(Duration::ZERO).is_none();
    assert!(alive, "the agent exited during the run; its stderr:\n{}", agent.output());
    let after = usage(pid);
    println!("agent pid {pid} after:  {after}");
    check_serving(&agent.socket, &values);
    println!("still serving: /v1/health 200, valid reads 200 with the right values");
    if sent < o.count {
        println!("stopped at the {} s limit before {} requests", o.max_secs, o.count);
    }
    agent.stop();
}

/// Health answers 200 and each secret reads back its value (compared, never printed).
fn check_serving(socket: &Path, values: &[String]) {
    let (status, _) = raw_get(socket, "/v1/health", &[]).expect("health request");
    assert_eq!(status, 200, "/v1/health");
    for (name, value) in SECRETS.iter().zip(values) {
        let (status, body) = raw_get(socket, &format!("/v1/secrets/{name}"), &[]).expect("read request");
        assert_eq!(status, 200, "GET /v1/secrets/{name}");
        let v: serde_json::Value = serde_json::from_str(&body).expect("a JSON body");
        assert!(v["value"].as_str() == Some(value.as_str()), "{name}: the value read is not the one stored");
    }
}

/// RSS and open fds of `pid`, from /proc.
fn usage(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status.lines().find(|l| l.starts_with(k)).map(|l| l[k.len()..].trim().to_owned()).unwrap_or_default()
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    format!("VmRSS {}, VmHWM {}, threads {}, fds {fds}", field("VmRSS:"), field("VmHWM:"), field("Threads:"))
}

fn worker(socket: &Path, n: u64, mut rng: fastrand::Rng, c: &Counts, stop: &AtomicBool, deadline: Instant) {
    let mut done = 0;
    while done < n {
        if Instant::now() >= deadline || stop.load(Ordering::Relaxed) {
            return;
        }
        // 1 to 4 requests on one connection (pipelined keep-alive), the last one closing.
        let k = (n - done).min(if rng.u8(..) < 200 { 1 } else { rng.u64(2..=4) });
        let mut bytes = Vec::new();
        let mut complete = true;
        for i in 0..k {
            let (req, whole) = request(&mut rng, i + 1 == k);
            bytes.extend_from_slice(&req);
            complete &= whole;
        }
        done += k;
        c.sent.fetch_add(k, Ordering::Relaxed);
        c.connections.fetch_add(1, Ordering::Relaxed);
        let Ok(mut s) = UnixStream::connect(socket) else {
            c.connect_failed.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        // A truncated head may wait for the agent's header timeout: give up on it quickly. Once
        // an answer has come, the rest (a pipelined request whose body swallowed the next)
        // may wait for bytes that never come: 50 ms more.
        let wait = if complete { Duration::from_secs(2) } else { Duration::from_millis(20) };
        s.set_read_timeout(Some(wait)).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(&bytes);
        let mut out = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(m) => out.extend_from_slice(&buf[..m]),
                Err(_) => {
                    if out.is_empty() && complete {
                        c.timed_out.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
            }
            let _ = s.set_read_timeout(Some(Duration::from_millis(50)));
            if out.len() > 1 << 20 {
                break;
            }
        }
        let mut answered = false;
        for at in memchr_all(&out, b"HTTP/1.1 ") {
            let class = out.get(at + 9).map_or(0, |d| d.wrapping_sub(b'0'));
            c.responses[if (1..=5).contains(&class) { class as usize } else { 0 }]
                .fetch_add(1, Ordering::Relaxed);
            answered = true;
        }
        if !answered {
            c.no_answer.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Offsets of `needle` in `hay` at line starts (a status line, not a body's text).
fn memchr_all(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    (0..hay.len().saturating_sub(needle.len() - 1))
        .filter(|&i| (i == 0 || hay[i - 1] == b'\n') && hay[i..].starts_with(needle))
        .collect()
}

fn pick<'a>(rng: &mut fastrand::Rng, xs: &[&'a str]) -> &'a str {
    xs[rng.usize(..xs.len())]
}

fn junk(rng: &mut fastrand::Rng, len: std::ops::Range<usize>) -> Vec<u8> {
    (0..rng.usize(len)).map(|_| rng.u8(..)).collect()
}

fn printable(rng: &mut fastrand::Rng, len: std::ops::Range<usize>) -> String {
    (0..rng.usize(len)).map(|_| rng.u8(0x21..0x7f) as char).collect()
}

/// One mutated request; `false` when it was cut short (the agent will wait for the rest).
fn request(rng: &mut fastrand::Rng, last: bool) -> (Vec<u8>, bool) {
    let roll = rng.u8(..100);
    if roll < 5 {
        // Plain garbage.
        return (junk(rng, 1..4096), false);
    }
    let method =
        match rng.u8(..10) {
            0..=5 => "GET".to_owned(),
            6 | 7 => pick(rng, &["POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "TRACE", "CONNECT"])
                .to_owned(),
            8 => printable(rng, 1..12),
            _ => pick(rng, &["get", "G ET", "GET\0", "", "GETGETGETGETGETGETGETGETGETGETGETGETGETGET"])
                .to_owned(),
        };
    let name = match rng.u8(..8) {
        0..=3 => pick(rng, SECRETS).to_owned(),
        4 => pick(rng, &["no-such-secret", "a", "db_password", "..", "%2e%2e", "x/y", "%00", "-"]).to_owned(),
        5 => "a".repeat(rng.usize(100..200)),
        6 => printable(rng, 0..40),
        _ => String::from_utf8_lossy(&junk(rng, 0..20)).replace(['\r', '\n', ' '], "%"),
    };
    let mut path = match rng.u8(..10) {
        0..=1 => "/v1/health".to_owned(),
        2..=6 => format!("/v1/secrets/{name}"),
        7 => pick(
            rng,
            &["/", "*", "/v1", "/v1/secrets", "/v1/secrets/", "//v1/health", "/v2/x", "http://h/v1/health"],
        )
        .to_owned(),
        8 => format!("/{}", "v1/".repeat(rng.usize(1..3000))),
        _ => printable(rng, 0..64),
    };
    if rng.bool() {
        let pairs: Vec<String> = (0..rng.usize(1..5))
            .map(|_| {
                let k = pick(rng, &["vault", "version", "changed_from", "wait", "raw", "x", "", "vault%3d"]);
                let v = match rng.u8(..6) {
                    0 => "default".to_owned(),
                    1 => "0123456789abcdef0123456789abcdef".to_owned(),
                    2 => rng.u32(..1000).to_string(),
                    3 => "%zz%".to_owned(),
                    4 => printable(rng, 0..300).replace(['#', '&'], ""),
                    _ => String::new(),
                };
                format!("{k}={v}")
            })
            .collect();
        path = format!("{path}?{}", pairs.join("&"));
    }
    let version = match rng.u8(..20) {
        0 => "HTTP/1.0",
        1 => "HTTP/2.0",
        2 => "HTTP/9.9",
        3 => "",
        _ => "HTTP/1.1",
    };
    let mut head = format!("{method} {path} {version}\r\n");
    if rng.u8(..10) != 0 {
        head.push_str("Host: kvbroker\r\n");
    }
    let mut body = Vec::new();
    for _ in 0..rng.usize(0..4) {
        match rng.u8(..14) {
            0 => head.push_str(&format!("Content-Length: {}\r\n", rng.u32(..64))),
            1 => head
                .push_str(pick(rng, &["Content-Length: -1\r\n", "Content-Length: 99999999999999999999\r\n"])),
            2 => head.push_str("Transfer-Encoding: chunked\r\n"),
            3 => head.push_str(&format!("If-None-Match: \"{}\"\r\n", printable(rng, 0..40))),
            4 => head.push_str(pick(rng, &["Accept: application/octet-stream\r\n", "Accept: */*\r\n"])),
            5 => head.push_str(&format!(
                "X-{}: {}\r\n",
                printable(rng, 8..9).replace(':', ""),
                printable(rng, 30..31)
            )),
            6 => head.push_str(&format!("X-Big: {}\r\n", "b".repeat(rng.usize(1000..70_000)))),
            7 => {
                for i in 0..rng.usize(50..300) {
                    head.push_str(&format!("X-Many-{i}: {i}\r\n"));
                }
            }
            8 => head.push_str(&format!("{}\r\n", printable(rng, 20..21))), // no colon
            9 => head.push_str("Expect: 100-continue\r\n"),
            10 => head.push_str("Connection: keep-alive, upgrade\r\nUpgrade: h2c\r\n"),
            11 => head.push_str(" folded: line\r\n"),
            12 => head.push_str(&format!("Range: bytes={}-\r\n", rng.u32(..))),
            _ => body = junk(rng, 0..128),
        }
    }
    if last {
        head.push_str("Connection: close\r\n");
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&body);
    // Byte-level damage on a fifth of the rest.
    let mut whole = true;
    match rng.u8(..20) {
        0 => {
            // Truncated anywhere.
            let at = rng.usize(..bytes.len());
            bytes.truncate(at);
            whole = false;
        }
        1 => {
            for _ in 0..rng.usize(1..8) {
                let i = rng.usize(..bytes.len());
                bytes[i] = rng.u8(..);
            }
        }
        2 => {
            let i = rng.usize(..bytes.len());
            let extra = junk(rng, 1..64);
            bytes.splice(i..i, extra);
        }
        3 => {
            // Line endings mangled.
            bytes = String::from_utf8_lossy(&bytes)
                .replace("\r\n", pick(rng, &["\n", "\r", "\r\r\n"]))
                .into_bytes();
        }
        _ => {}
    }
    (bytes, whole)
}
