//! `kvbroker-bench [--quick] [--strace] [--out FILE] [SCENARIO…]`: where kvbroker stands against the
//! floor. Starts the real agent (and the emulator for cold reads), drives it through the
//! real client crate, and runs the same load against a bare hyper server on a Unix socket
//! in this process (no attestation, policy or audit) to report ratios.
//!
//! Scenarios: `cached` (with `floor`), `cold`, `scale`, `audit`, `mask` (job-output masker
//! throughput in process, and added latency per line through `kvb exec`). Default: all.
//! `oha` (not in the default set): the same cached read and floor, loaded by `oha`, an HTTP
//! load generator we did not write (installed with `cargo install oha --locked` if missing):
//! 3 rounds × 1/16/64 kept-alive connections × 5 s, agent and floor interleaved; `--strace`
//! adds system calls per read (`strace -f -c` on the agent over 20,000 oha reads). Then audit
//! `fsync` against `write` at 64 connections, interleaved, 3 rounds.
//! `memory` (not in the default set either): RSS with 0 / 1,000 / 10,000 secrets, at ready and
//! after one read of each, without load.
//! Build with `--release` first: `cargo run --release -p kvbroker-tests --bin kvbroker-bench`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "benchmark harness: failures should stop it loudly"
)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvbroker_tests::{Agent, EmulatorProc, TempDir};
use serde_json::{Value, json};

struct Opts {
    quick: bool,
    run_for: Duration,
}

#[derive(Clone, Copy)]
enum Conn {
    KeepAlive,
    PerRead,
}

struct Load {
    reads_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    errors: u64,
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

/// `clients` tasks reading `names` round-robin for `run_for`, through the client crate.
fn drive(
    rt: &tokio::runtime::Runtime,
    socket: &Path,
    names: &[String],
    clients: usize,
    conn: Conn,
    run_for: Duration,
) -> Load {
    let names = Arc::new(names.to_vec());
    let socket = socket.to_owned();
    rt.block_on(async move {
        let start = Instant::now();
        let deadline = start + run_for;
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let (names, socket) = (Arc::clone(&names), socket.clone());
                tokio::spawn(async move {
                    let keep = kvbroker_client::Client::builder().socket(&socket).build();
                    let mut lat = Vec::with_capacity(100_000);
                    let mut errors = 0u64;
                    let mut i = c;
                    while Instant::now() < deadline {
                        let name = &names[i % names.len()];
                        i += 1;
                        let t = Instant::now();
                        let r = match conn {
                            Conn::KeepAlive => keep.get(name).await,
                            Conn::PerRead => {
                                kvbroker_client::Client::builder().socket(&socket).build().get(name).await
                            }
                        };
                        match r {
                            Ok(_) => lat.push(t.elapsed().as_nanos() as u64),
                            Err(_) => errors += 1,
                        }
                    }
                    (lat, errors)
                })
            })
            .collect();
        let mut all = Vec::new();
        let mut errors = 0;
        for t in tasks {
            let (l, e) = t.await.unwrap();
            all.extend(l);
            errors += e;
        }
        let elapsed = start.elapsed().as_secs_f64();
        all.sort_unstable();
        Load {
            reads_per_sec: all.len() as f64 / elapsed,
            p50_us: pct(&all, 0.50),
            p99_us: pct(&all, 0.99),
            p999_us: pct(&all, 0.999),
            errors,
        }
    })
}

/// The floor: a bare hyper server answering every request with `body`, on its own runtime.
struct Floor {
    socket: PathBuf,
    _dir: TempDir,
    _thread: std::thread::JoinHandle<()>,
}

fn floor(body: Vec<u8>) -> Floor {
    use http_body_util::Full;
    use hyper::service::service_fn;
    let dir = TempDir::new("floor");
    let socket = dir.path().join("floor.sock");
    let path = socket.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::UnixListener::bind(&path).unwrap();
            ready_tx.send(()).unwrap();
            let body = bytes::Bytes::from(body);
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                let body = body.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |_req| {
                        let body = body.clone();
                        async move {
                            let mut r = http::Response::new(Full::new(body));
                            r.headers_mut().insert(
                                http::header::CONTENT_TYPE,
                                http::HeaderValue::from_static("application/json"),
                            );
                            Ok::<_, std::convert::Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    });
    ready_rx.recv().unwrap();
    Floor { socket, _dir: dir, _thread: thread }
}

/// `kvbroker-bench floor`: serves the floor (a 100-byte secret's answer) until killed and
/// prints its socket and pid, to profile it beside the agent under the same load.
fn serve_floor() {
    let fl = floor(secret_json("s", &"v".repeat(100)));
    println!("floor socket {} pid {}", fl.socket.display(), std::process::id());
    loop {
        std::thread::park();
    }
}

fn secret_json(name: &str, value: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "vault": "default", "name": name, "version": "0123456789abcdef0123456789abcdef", "value": value,
        "content_type": null, "not_before": null, "expires_on": null,
        "fetched_at": "2026-11-23T00:00:00Z", "stale": false
    }))
    .unwrap()
}

fn bench_agent(tag: &str, secrets: &[(String, String)], durability: &'static str) -> Agent {
    let mut b = Agent::builder(tag)
        .allow_uid(0)
        .durability(durability)
        .limits("rate_per_second = 10000000\nburst = 10000000\nconnections_per_uid = 100000");
    for (n, v) in secrets {
        b = b.secret(n, v);
    }
    b.start()
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn raise_fd_limit() {
    #[allow(unsafe_code)]
    // SAFETY: setrlimit with a valid, fully initialised struct; affects only this process
    // (and the agents it starts), which need thousands of sockets for the cold-read herd.
    unsafe {
        let lim = libc::rlimit { rlim_cur: 65_536, rlim_max: 65_536 };
        libc::setrlimit(libc::RLIMIT_NOFILE, &raw const lim);
    }
}

fn value_of(len: usize) -> String {
    "x".repeat(len)
}

fn cached(rt: &tokio::runtime::Runtime, o: &Opts, rows: &mut Vec<Value>) {
    let sizes: &[(usize, &str)] = if o.quick { &[(100, "100B")] } else { &[(100, "100B"), (20_000, "20KB")] };
    let modes: &[&'static str] = &["write", "fsync"];
    let clients: &[usize] = &[1, 16, 64];
    let conns: &[(Conn, &str)] = if o.quick {
        &[(Conn::KeepAlive, "keep-alive")]
    } else {
        &[(Conn::KeepAlive, "keep-alive"), (Conn::PerRead, "new-conn")]
    };
    println!("\n== cached reads (agent vs floor: bare hyper on a Unix socket, same process as the load)");
    println!(
        "{:<6} {:<10} {:<6} {:>4} | {:>10} {:>8} {:>8} {:>8} | {:>10} {:>8} | {:>6} {:>6}",
        "size",
        "conn",
        "audit",
        "cli",
        "reads/s",
        "p50µs",
        "p99µs",
        "p99.9µs",
        "floor r/s",
        "fl p50",
        "x r/s",
        "x p50"
    );
    for (len, label) in sizes {
        let names = vec!["bench-secret".to_owned()];
        let secrets = vec![(names[0].clone(), value_of(*len))];
        let fl = floor(secret_json(&names[0], &secrets[0].1));
        for mode in modes {
            let agent = bench_agent("bench-cached", &secrets, mode);
            for (conn, conn_label) in conns {
                for &c in clients {
                    if o.quick && *mode == "fsync" && c != 64 {
                        continue;
                    }
                    let a = drive(rt, &agent.socket, &names, c, *conn, o.run_for);
                    let f = drive(rt, &fl.socket, &names, c, *conn, o.run_for);
                    println!(
                        "{:<6} {:<10} {:<6} {:>4} | {:>10.0} {:>8.1} {:>8.1} {:>8.1} | {:>10.0} {:>8.1} | {:>6.2} {:>6.2}{}",
                        label,
                        conn_label,
                        mode,
                        c,
                        a.reads_per_sec,
                        a.p50_us,
                        a.p99_us,
                        a.p999_us,
                        f.reads_per_sec,
                        f.p50_us,
                        a.reads_per_sec / f.reads_per_sec,
                        a.p50_us / f.p50_us,
                        if a.errors + f.errors > 0 {
                            format!("  errors {}/{}", a.errors, f.errors)
                        } else {
                            String::new()
                        }
                    );
                    rows.push(json!({
                        "scenario": "cached", "size": label, "conn": conn_label, "audit": mode, "clients": c,
                        "reads_per_sec": a.reads_per_sec, "p50_us": a.p50_us, "p99_us": a.p99_us, "p999_us": a.p999_us,
                        "floor_reads_per_sec": f.reads_per_sec, "floor_p50_us": f.p50_us, "floor_p99_us": f.p99_us,
                        "ratio_reads_per_sec": a.reads_per_sec / f.reads_per_sec, "ratio_p50": a.p50_us / f.p50_us,
                        "errors": a.errors
                    }));
                }
            }
        }
    }
}

fn cold(rt: &tokio::runtime::Runtime, o: &Opts, rows: &mut Vec<Value>) {
    println!("\n== cold herd: N concurrent first reads of one secret (Key Vault = the emulator)");
    println!("{:>6} | {:>12} {:>16}", "N", "all served ms", "Key Vault GETs");
    let ns: &[usize] = if o.quick { &[1, 64] } else { &[1, 64, 1000] };
    let names: Vec<String> = ns.iter().map(|n| format!("cold-{n}")).collect();
    let pairs: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "cold-value")).collect();
    let emu = EmulatorProc::start(&pairs);
    let agent = Agent::builder("bench-cold")
        .keyvault(&emu, "azure-ml")
        .allow_uid(0)
        .limits("rate_per_second = 10000000\nburst = 10000000\nconnections_per_uid = 100000")
        .start();
    // Token and challenge first, so the herd measures the secret fetch alone.
    let warm = kvbroker_client::blocking::Client::with_socket(&agent.socket).unwrap();
    let _ = warm.get("warm-up-missing");
    for (n, name) in ns.iter().zip(&names) {
        emu.reset_counts();
        let socket = agent.socket.clone();
        let name = name.clone();
        let n = *n;
        let (took, ok) = rt.block_on(async move {
            let t = Instant::now();
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    let c = kvbroker_client::Client::builder().socket(&socket).build();
                    let name = name.clone();
                    tokio::spawn(async move { c.get(&name).await.is_ok() })
                })
                .collect();
            let mut ok = 0;
            for t in tasks {
                ok += usize::from(t.await.unwrap());
            }
            (t.elapsed(), ok)
        });
        let gets = emu.count("get");
        println!(
            "{:>6} | {:>12.1} {:>16}{}",
            n,
            took.as_secs_f64() * 1000.0,
            gets,
            if ok == n { String::new() } else { format!("  ({ok}/{n} ok)") }
        );
        rows.push(json!({"scenario": "cold", "n": n, "ms": took.as_secs_f64() * 1000.0, "key_vault_gets": gets, "ok": ok}));
    }
}

fn scale(rt: &tokio::runtime::Runtime, o: &Opts, rows: &mut Vec<Value>) {
    println!("\n== scale: cached secrets vs RSS and p99 (16 clients, keep-alive); start-to-ready");
    println!("{:>7} | {:>9} {:>9} {:>10} | {:>10}", "secrets", "RSS MiB", "p99 µs", "reads/s", "ready ms");
    let counts: &[usize] = if o.quick { &[10, 1000] } else { &[10, 1000, 10_000] };
    for &n in counts {
        let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        let secrets: Vec<(String, String)> =
            names.iter().map(|k| (k.clone(), format!("value-{k}-{}", "v".repeat(40)))).collect();
        let t = Instant::now();
        let agent = bench_agent("bench-scale", &secrets, "write");
        let ready = t.elapsed();
        // Cache every secret, then read them at random order for the measurement.
        let client = kvbroker_client::blocking::Client::with_socket(&agent.socket).unwrap();
        for k in &names {
            client.get(k).unwrap();
        }
        let load = drive(rt, &agent.socket, &names, 16, Conn::KeepAlive, o.run_for);
        let rss = rss_kib(agent.proc.pid()) as f64 / 1024.0;
        println!(
            "{:>7} | {:>9.1} {:>9.1} {:>10.0} | {:>10.1}",
            n,
            rss,
            load.p99_us,
            load.reads_per_sec,
            ready.as_secs_f64() * 1000.0
        );
        rows.push(json!({"scenario": "scale", "secrets": n, "rss_mib": rss, "p99_us": load.p99_us, "reads_per_sec": load.reads_per_sec, "start_to_ready_ms": ready.as_secs_f64() * 1000.0}));
    }
}

/// RSS and its parts, from `/proc/PID/status`, in KiB: (VmRSS, RssAnon, RssFile, VmLck).
fn mem_kib(pid: u32) -> (u64, u64, u64, u64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"), field("RssFile:"), field("VmLck:"))
}

/// `memory` (not in the default set): RSS of an agent with N secrets in a `local` vault, at
/// ready and after one read of each (one connection, no load), with its anonymous, file-backed
/// and locked parts. Deterministic enough to compare builds, unlike the reads/s columns.
fn memory(rows: &mut Vec<Value>) {
    println!("\n== memory: RSS with N cached secrets (local vault, ~60 B values, each read once)");
    println!(
        "{:>7} | {:>9} {:>9} | {:>9} {:>9} {:>9} {:>9} | {:>9}",
        "secrets", "ready MiB", "anon", "read MiB", "anon", "file", "locked", "B/secret"
    );
    for n in [0usize, 1000, 10_000] {
        let names: Vec<String> = (0..n).map(|i| format!("s{i}")).collect();
        let secrets: Vec<(String, String)> =
            names.iter().map(|k| (k.clone(), format!("value-{k}-{}", "v".repeat(40)))).collect();
        let agent = bench_agent("bench-memory", &secrets, "write");
        let pid = agent.proc.pid();
        let ready = mem_kib(pid);
        let client = kvbroker_client::blocking::Client::with_socket(&agent.socket).unwrap();
        for k in &names {
            client.get(k).unwrap();
        }
        let read = mem_kib(pid);
        let per = if n == 0 { 0 } else { (read.0.saturating_sub(ready.0) * 1024) / n as u64 };
        let mib = |k: u64| k as f64 / 1024.0;
        println!(
            "{:>7} | {:>9.1} {:>9.1} | {:>9.1} {:>9.1} {:>9.1} {:>9.1} | {:>9}",
            n,
            mib(ready.0),
            mib(ready.1),
            mib(read.0),
            mib(read.1),
            mib(read.2),
            mib(read.3),
            per
        );
        rows.push(json!({"scenario": "memory", "secrets": n, "ready_rss_mib": mib(ready.0), "rss_mib": mib(read.0), "anon_mib": mib(read.1), "file_mib": mib(read.2), "locked_mib": mib(read.3)}));
    }
}

fn audit(rt: &tokio::runtime::Runtime, o: &Opts, rows: &mut Vec<Value>) {
    println!("\n== audit: records/s (one per read) and latency added over the floor, per durability");
    println!("{:<6} {:>4} | {:>10} {:>9} {:>12}", "mode", "cli", "records/s", "p50 µs", "+µs vs floor");
    let names = vec!["audit-secret".to_owned()];
    let secrets = vec![(names[0].clone(), value_of(100))];
    let fl = floor(secret_json(&names[0], &secrets[0].1));
    let mut by_mode = Vec::new();
    for mode in ["write", "fsync"] {
        let agent = bench_agent("bench-audit", &secrets, mode);
        for c in [1usize, 64] {
            let a = drive(rt, &agent.socket, &names, c, Conn::KeepAlive, o.run_for);
            let f = drive(rt, &fl.socket, &names, c, Conn::KeepAlive, o.run_for);
            println!(
                "{:<6} {:>4} | {:>10.0} {:>9.1} {:>12.1}",
                mode,
                c,
                a.reads_per_sec,
                a.p50_us,
                a.p50_us - f.p50_us
            );
            rows.push(json!({"scenario": "audit", "durability": mode, "clients": c, "records_per_sec": a.reads_per_sec, "p50_us": a.p50_us, "added_p50_us_vs_floor": a.p50_us - f.p50_us}));
            if c == 64 {
                by_mode.push(a.reads_per_sec);
            }
        }
    }
    if let [w, f] = by_mode[..] {
        println!("fsync / write throughput at 64 clients: {:.2}", f / w);
    }
}

/// 50 values of 24 to 72 characters, as Key Vault secrets tend to be.
fn mask_values() -> Vec<String> {
    (0usize..50)
        .map(|i| {
            let len = 24 + (i * 7) % 49;
            (0..len).map(|_| fastrand::alphanumeric()).collect::<String>()
                + if i.is_multiple_of(5) { "/+=" } else { "" }
        })
        .collect()
}

/// Job-like output: training-log lines, one in 1000 carrying a value.
fn job_output(values: &[String], bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes + 256);
    let mut i = 0usize;
    while out.len() < bytes {
        i += 1;
        let line = if i.is_multiple_of(1000) {
            format!(
                "2026-11-22T10:00:00.123Z WARN config dump: password={} retrying\n",
                values[i % values.len()]
            )
        } else {
            format!(
                "2026-11-22T10:00:00.123Z INFO epoch {} step {i} loss={:.4} lr=3e-4 grad_norm={:.3} tokens/s={}\n",
                i / 5000,
                1.0 / (i as f64).sqrt(),
                (i % 97) as f64 / 10.0,
                31_000 + i % 977
            )
        };
        out.extend_from_slice(line.as_bytes());
    }
    out
}

/// The masker alone (MB/s of job output, in 64 KiB reads and in one write per line), then
/// the added latency per line through the real `kvb exec`, masked vs `--no-mask`.
fn mask(o: &Opts, rows: &mut Vec<Value>) {
    use kvbroker_proto::mask::{MaskValues, Masker};
    let values = mask_values();
    let set = Arc::new(MaskValues::new());
    for v in &values {
        set.learn(v.as_bytes());
    }
    let patterns = set.snapshot().1.len();
    let text = job_output(&values, if o.quick { 8 << 20 } else { 64 << 20 });
    let lines: Vec<&[u8]> = text.split_inclusive(|&b| b == b'\n').collect();
    for (chunking, chunks) in [("64KiB", text.chunks(64 * 1024).collect::<Vec<_>>()), ("line", lines)] {
        let mut m = Masker::new(Arc::clone(&set));
        let mut out = Vec::with_capacity(128 * 1024);
        let start = Instant::now();
        for c in &chunks {
            out.clear();
            m.push(c, &mut out);
        }
        m.finish(&mut out);
        let secs = start.elapsed().as_secs_f64();
        let mbps = text.len() as f64 / secs / 1e6;
        println!(
            "mask throughput, {chunking} writes: {mbps:.0} MB/s ({} values, {patterns} patterns)",
            values.len()
        );
        rows.push(json!({"scenario": "mask", "chunking": chunking, "values": values.len(), "patterns": patterns, "mb_per_sec": mbps}));
    }

    let mut b = Agent::builder("bench-mask").allow_uid(0);
    for (i, v) in values.iter().enumerate() {
        b = b.secret(&format!("s{i}"), v);
    }
    let agent = b.start();
    let lines = if o.quick { 200 } else { 1000 };
    // The child stamps each line with the wall clock as it writes it; we stamp it as it
    // arrives. Same clock, same machine.
    let child = format!(
        "import sys, time\nfor i in range({lines}):\n    sys.stdout.write(f'{{time.time_ns()}} epoch 1 step {{i}} loss=0.25\\n'); sys.stdout.flush(); time.sleep(0.002)\n"
    );
    let mut base_p50 = 0.0;
    for masked in [false, true] {
        let mut cmd = std::process::Command::new(kvbroker_tests::bin("kvb"));
        cmd.env("KVBROKER_SOCKET", &agent.socket).arg("exec");
        if !masked {
            cmd.arg("--no-mask");
        }
        for i in 0..values.len() {
            cmd.arg("--env").arg(format!("S{i}=s{i}"));
        }
        cmd.args(["--", "python3", "-c", &child]).stdout(std::process::Stdio::piped());
        let mut proc = cmd.spawn().unwrap();
        let reader = std::io::BufReader::new(proc.stdout.take().unwrap());
        let mut lat: Vec<u64> = Vec::with_capacity(lines);
        for line in std::io::BufRead::lines(reader) {
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
            let line = line.unwrap();
            let sent: u64 = line.split(' ').next().unwrap().parse().unwrap();
            lat.push(now.saturating_sub(sent));
        }
        assert!(proc.wait().unwrap().success());
        assert_eq!(lat.len(), lines, "every line arrived");
        lat.sort_unstable();
        let (p50, p99, max) = (pct(&lat, 0.5), pct(&lat, 0.99), *lat.last().unwrap() as f64 / 1000.0);
        let mode = if masked { "masked" } else { "--no-mask" };
        if !masked {
            base_p50 = p50;
        }
        println!(
            "kvb exec {mode}: line latency p50 {p50:.0} us, p99 {p99:.0} us, max {max:.0} us ({lines} lines)"
        );
        rows.push(json!({"scenario": "mask-latency", "mode": mode, "lines": lines, "p50_us": p50, "p99_us": p99, "max_us": max, "added_p50_us": p50 - base_p50}));
    }
}

/// What one `oha` run measured.
struct OhaRun {
    reads_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
    /// Answers that were not 200 (plus transport errors other than the deadline's aborts).
    bad: u64,
    ok: u64,
}

fn oha_bin() -> PathBuf {
    let found = std::process::Command::new("oha").arg("--version").output().is_ok_and(|o| o.status.success());
    if !found {
        println!("oha not found: cargo install oha --locked (a few minutes)");
        let st = std::process::Command::new("cargo").args(["install", "oha", "--locked"]).status().unwrap();
        assert!(st.success(), "cargo install oha failed");
    }
    PathBuf::from("oha")
}

/// `oha` against a Unix socket (the URL's host is not resolved: no network), for `secs`
/// seconds or `n` requests, with `clients` kept-alive connections.
fn oha(socket: &Path, clients: usize, secs: Option<u64>, n: Option<u64>) -> OhaRun {
    let mut cmd = std::process::Command::new(oha_bin());
    cmd.args(["--no-tui", "--output-format", "json", "-c", &clients.to_string()]);
    if let Some(s) = secs {
        cmd.args(["-z", &format!("{s}s")]);
    }
    if let Some(n) = n {
        cmd.args(["-n", &n.to_string()]);
    }
    cmd.arg("--unix-socket").arg(socket).arg("http://localhost/v1/secrets/bench-secret");
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "oha failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let codes = v["statusCodeDistribution"].as_object().cloned().unwrap_or_default();
    let ok = codes.get("200").and_then(Value::as_u64).unwrap_or(0);
    let not_ok: u64 = codes.iter().filter(|(k, _)| *k != "200").filter_map(|(_, n)| n.as_u64()).sum();
    let errors: u64 = v["errorDistribution"]
        .as_object()
        .map(|m| m.iter().filter(|(k, _)| !k.contains("deadline")).filter_map(|(_, n)| n.as_u64()).sum())
        .unwrap_or(0);
    let total = v["summary"]["total"].as_f64().unwrap_or(1.0);
    let lat = |p: &str| v["latencyPercentiles"][p].as_f64().unwrap_or(0.0) * 1e6;
    OhaRun {
        reads_per_sec: ok as f64 / total,
        p50_us: lat("p50"),
        p99_us: lat("p99"),
        bad: not_ok + errors,
        ok,
    }
}

/// The agent's answer to a read, exactly as sent: the floor answers with the same bytes.
fn raw_answer(socket: &Path) -> Vec<u8> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.write_all(b"GET /v1/secrets/bench-secret HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let at = out.windows(4).position(|w| w == b"\r\n\r\n").expect("an HTTP answer") + 4;
    assert!(out.starts_with(b"HTTP/1.1 200"), "the agent did not answer 200");
    out[at..].to_vec()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// System calls the agent made per read: `strace -f -c` attached to it while oha makes `n`
/// reads on `clients` connections.
/// CPU time (user + system, all threads) a process has used, in µs, from `/proc/PID/stat`.
fn cpu_us(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the `(comm)`: state is the 3rd field; utime and stime the 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|u| u.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
    let hz: f64 = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0);
    ticks * 1e6 / hz
}

/// System calls (the kernel's `raw_syscalls:sys_enter` tracepoint, counted by `perf stat`:
/// no strace slowdown) and CPU µs of process `pid` per read, over an oha run of `secs` s.
/// `None` when perf cannot count tracepoints here.
fn kernel_counts(pid: u32, socket: &Path, clients: usize, secs: u64) -> Option<(f64, f64, f64)> {
    let out = std::env::temp_dir().join(format!("kvbroker-bench-perf-{}-{clients}", std::process::id()));
    let mut perf = std::process::Command::new("perf")
        .args(["stat", "-x", ",", "-e", "raw_syscalls:sys_enter", "-o"])
        .arg(&out)
        .args(["-p", &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    let cpu0 = cpu_us(pid);
    let run = oha(socket, clients, Some(secs), None);
    let cpu = cpu_us(pid) - cpu0;
    let _ = std::process::Command::new("kill").args(["-INT", &perf.id().to_string()]).status();
    let _ = perf.wait();
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    let calls: f64 = text
        .lines()
        .find(|l| l.contains("raw_syscalls:sys_enter"))
        .and_then(|l| l.split(',').next())
        .and_then(|n| n.trim().parse().ok())?;
    let reads = run.ok.max(1) as f64;
    Some((calls / reads, cpu / reads, run.reads_per_sec))
}

fn syscalls_per_read(agent_pid: u32, socket: &Path, clients: usize, n: u64) -> (f64, String) {
    let out = std::env::temp_dir().join(format!("kvbroker-bench-strace-{}", std::process::id()));
    let mut strace = std::process::Command::new("strace")
        .args(["-f", "-c", "-o"])
        .arg(&out)
        .args(["-p", &agent_pid.to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("strace (apt-get install strace)");
    std::thread::sleep(Duration::from_millis(500));
    let run = oha(socket, clients, None, Some(n));
    // SIGINT: strace detaches and writes its summary.
    let _ = std::process::Command::new("kill").args(["-INT", &strace.id().to_string()]).status();
    strace.wait().unwrap();
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    if let Ok(keep) = std::env::var("KVBROKER_BENCH_STRACE_DIR") {
        let _ = std::fs::write(Path::new(&keep).join(format!("strace-{clients}.txt")), &text);
    }
    // The `total` line: `100.00  SECONDS  USECS/CALL  CALLS  [ERRORS]  total`.
    let total: u64 = text
        .lines()
        .find(|l| l.trim_end().ends_with("total"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if total == 0 {
        println!("(no strace total found in: {text})");
    }
    (total as f64 / run.ok.max(1) as f64, text)
}

fn oha_scenario(o: &Opts, strace: bool, rows: &mut Vec<Value>) {
    let rounds = if o.quick { 1 } else { 3 };
    let secs = if o.quick { 1 } else { 5 };
    let clients: &[usize] = &[1, 16, 64];
    let secrets = vec![("bench-secret".to_owned(), value_of(100))];
    let agent = bench_agent("bench-oha", &secrets, "write");
    let fl = floor(raw_answer(&agent.socket));
    println!(
        "\n== oha: cached reads, 100 B secret, audit `write`, kept-alive connections; agent and floor interleaved, {rounds} rounds × {secs} s"
    );
    println!(
        "{:>5} {:>4} | {:>10} {:>8} {:>8} | {:>10} {:>8} {:>8} | {:>6} {:>6}",
        "round", "cli", "agent r/s", "p50µs", "p99µs", "floor r/s", "p50µs", "p99µs", "x r/s", "x p50"
    );
    // Per client count: agent reads/s, floor reads/s, agent p50, floor p50, one per round.
    #[allow(clippy::type_complexity, reason = "a local table, named by the comment above")]
    let mut by_clients: Vec<(usize, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>)> =
        clients.iter().map(|&c| (c, Vec::new(), Vec::new(), Vec::new(), Vec::new())).collect();
    for round in 1..=rounds {
        for (c, a_rs, f_rs, a_p50, f_p50) in &mut by_clients {
            let a = oha(&agent.socket, *c, Some(secs), None);
            let f = oha(&fl.socket, *c, Some(secs), None);
            println!(
                "{:>5} {:>4} | {:>10.0} {:>8.1} {:>8.1} | {:>10.0} {:>8.1} {:>8.1} | {:>6.2} {:>6.2}{}",
                round,
                c,
                a.reads_per_sec,
                a.p50_us,
                a.p99_us,
                f.reads_per_sec,
                f.p50_us,
                f.p99_us,
                a.reads_per_sec / f.reads_per_sec,
                a.p50_us / f.p50_us,
                if a.bad + f.bad > 0 {
                    format!("  not 200 / errors: {}/{}", a.bad, f.bad)
                } else {
                    String::new()
                }
            );
            rows.push(json!({
                "scenario": "oha", "round": round, "clients": *c, "seconds": secs,
                "reads_per_sec": a.reads_per_sec, "p50_us": a.p50_us, "p99_us": a.p99_us, "bad": a.bad,
                "floor_reads_per_sec": f.reads_per_sec, "floor_p50_us": f.p50_us, "floor_p99_us": f.p99_us, "floor_bad": f.bad
            }));
            a_rs.push(a.reads_per_sec);
            f_rs.push(f.reads_per_sec);
            a_p50.push(a.p50_us);
            f_p50.push(f.p50_us);
        }
    }
    println!("medians:");
    for (c, a_rs, f_rs, a_p50, f_p50) in by_clients {
        let (a, f, ap, fp) = (median(a_rs), median(f_rs), median(a_p50), median(f_p50));
        println!(
            "{:>5} {:>4} | {:>10.0} {:>8.1} {:>8} | {:>10.0} {:>8.1} {:>8} | {:>6.2} {:>6.2}",
            "med",
            c,
            a,
            ap,
            "",
            f,
            fp,
            "",
            a / f,
            ap / fp
        );
    }
    // Audit durability under load: `fsync` against `write` at 64 connections, interleaved.
    let synced = bench_agent("bench-oha-fsync", &secrets, "fsync");
    let (mut w_rs, mut f_rs) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let w = oha(&agent.socket, 64, Some(secs), None);
        let f = oha(&synced.socket, 64, Some(secs), None);
        println!(
            "audit fsync vs write, 64 clients, round {round}: write {:.0} r/s, fsync {:.0} r/s ({:.2}×){}",
            w.reads_per_sec,
            f.reads_per_sec,
            f.reads_per_sec / w.reads_per_sec,
            if w.bad + f.bad > 0 {
                format!("  not 200 / errors: {}/{}", w.bad, f.bad)
            } else {
                String::new()
            }
        );
        rows.push(json!({
            "scenario": "oha-durability", "round": round, "clients": 64, "seconds": secs,
            "write_reads_per_sec": w.reads_per_sec, "fsync_reads_per_sec": f.reads_per_sec,
            "write_p50_us": w.p50_us, "fsync_p50_us": f.p50_us
        }));
        w_rs.push(w.reads_per_sec);
        f_rs.push(f.reads_per_sec);
    }
    let (w, f) = (median(w_rs), median(f_rs));
    println!("audit fsync vs write, 64 clients, medians: write {w:.0} r/s, fsync {f:.0} r/s ({:.2}×)", f / w);
    drop(synced);
    // Without strace: system calls per read from the kernel's own tracepoint, and CPU per
    // read, agent and floor (the floor runs in this process), one oha run each.
    println!("kernel-counted (perf stat raw_syscalls:sys_enter) and CPU per read, {secs} s oha runs:");
    for c in [1usize, 16, 64] {
        let a = kernel_counts(agent.proc.pid(), &agent.socket, c, secs);
        let f = kernel_counts(std::process::id(), &fl.socket, c, secs);
        match (a, f) {
            (Some((a_sys, a_cpu, a_rs)), Some((f_sys, f_cpu, f_rs))) => {
                println!(
                    "{c:>4} clients | agent {a_sys:.2} syscalls/read, {a_cpu:.1} µs CPU/read ({a_rs:.0} r/s) | floor {f_sys:.2} syscalls/read, {f_cpu:.1} µs CPU/read ({f_rs:.0} r/s)"
                );
                rows.push(json!({"scenario": "oha-kernel", "clients": c, "syscalls_per_read": a_sys, "cpu_us_per_read": a_cpu,
                    "floor_syscalls_per_read": f_sys, "floor_cpu_us_per_read": f_cpu}));
            }
            _ => println!("(perf cannot count raw_syscalls:sys_enter here: skipped)"),
        }
    }
    if strace {
        let n = if o.quick { 2_000 } else { 20_000 };
        for c in [1usize, 64] {
            let (per_read, _) = syscalls_per_read(agent.proc.pid(), &agent.socket, c, n);
            println!(
                "agent system calls per read, {c} client(s), {n} reads under strace -f -c: {per_read:.2}"
            );
            rows.push(
                json!({"scenario": "oha-strace", "clients": c, "reads": n, "syscalls_per_read": per_read}),
            );
        }
    }
}

const USAGE: &str = "usage: kvbroker-bench [--quick] [--strace] [--out FILE] [SCENARIO...]
scenarios: cached cold scale audit mask (the default set), oha, memory, floor (serves the
floor alone until killed); see docs/benchmarks.md";

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("{USAGE}");
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let mut out = PathBuf::from("target/kvbroker-bench.json");
    if let Some(i) = args.iter().position(|a| a == "--out") {
        out = PathBuf::from(args.get(i + 1).expect("--out FILE"));
        args.drain(i..=i + 1);
    }
    let strace = args.iter().any(|a| a == "--strace");
    args.retain(|a| a != "--quick" && a != "--strace");
    let all = ["cached", "cold", "scale", "audit", "mask"];
    let chosen: Vec<&str> =
        if args.is_empty() { all.to_vec() } else { args.iter().map(String::as_str).collect() };
    for c in &chosen {
        assert!(
            all.contains(c) || *c == "oha" || *c == "memory" || *c == "floor",
            "unknown scenario {c}\n{USAGE}"
        );
    }
    raise_fd_limit();
    let o = Opts { quick, run_for: if quick { Duration::from_millis(300) } else { Duration::from_secs(2) } };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let started = Instant::now();
    println!(
        "kvbroker-bench{}: {} cores, {}",
        if quick { " --quick" } else { "" },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        env!("CARGO_PKG_VERSION")
    );
    let mut rows = Vec::new();
    for c in chosen {
        match c {
            "cached" => cached(&rt, &o, &mut rows),
            "cold" => cold(&rt, &o, &mut rows),
            "scale" => scale(&rt, &o, &mut rows),
            "audit" => audit(&rt, &o, &mut rows),
            "mask" => mask(&o, &mut rows),
            "oha" => oha_scenario(&o, strace, &mut rows),
            "memory" => memory(&mut rows),
            "floor" => serve_floor(),
            _ => {}
        }
    }
    let report = json!({"quick": quick, "seconds": started.elapsed().as_secs_f64(), "results": rows});
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&out, serde_json::to_vec_pretty(&report).unwrap()).unwrap();
    println!("\nwrote {} ({:.0} s)", out.display(), started.elapsed().as_secs_f64());
}
