//! Issue 16: metrics, honest health and JSON logs, as an operator's Prometheus, probe and log
//! pipeline see them.
//!
//! Every scrape is parsed twice: by a strict check written here (OpenMetrics line grammar,
//! each sample under its family, `# EOF` last) and, when `target/py-venv-metrics` exists (CI
//! creates it and sets `KVBROKER_REQUIRE_PROM_PARSER=1`, making it mandatory), by the
//! Prometheus project's own Python parser; counter deltas are taken from the parsed samples.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kvbroker_tests::{Agent, EmulatorProc, Fault, bin, canary, curl, kvb, raw_get, raw_request, run};
use serde_json::Value;

/// Series (name with its labels sorted, as `name{k="v",…}`) → value.
type Samples = BTreeMap<String, f64>;

fn series(name: &str, labels: &[(&str, &str)]) -> String {
    let mut l: Vec<_> = labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
    l.sort();
    if l.is_empty() { name.to_owned() } else { format!("{name}{{{}}}", l.join(",")) }
}

fn is_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_' || f == ':')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_' || x == ':')
}

/// The strict check: every line is a descriptor, a sample of the family declared last, or
/// the final `# EOF`; label values are quoted with only `\\`, `\"`, `\n` escapes.
fn parse_strict(text: &str) -> Samples {
    let mut out = Samples::new();
    let mut family: Option<(String, String)> = None;
    let lines: Vec<&str> = text.split('\n').collect();
    assert_eq!(lines.last(), Some(&""), "the text ends with a newline");
    let lines = &lines[..lines.len() - 1];
    assert_eq!(lines.last(), Some(&"# EOF"), "OpenMetrics text ends with # EOF");
    for line in &lines[..lines.len() - 1] {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, arg) = (parts.next().unwrap(), parts.next().unwrap_or(""), parts.next());
            assert!(is_name(name), "bad family name in {line:?}");
            match kind {
                "TYPE" => {
                    let t = arg.unwrap_or("");
                    assert!(
                        ["counter", "gauge", "histogram", "info", "summary", "unknown", "stateset"]
                            .contains(&t),
                        "{line:?}"
                    );
                    family = Some((name.to_owned(), t.to_owned()));
                }
                "HELP" | "UNIT" => {}
                _ => panic!("unknown descriptor {line:?}"),
            }
            continue;
        }
        let (fam, ty) = family.as_ref().unwrap_or_else(|| panic!("sample before any # TYPE: {line:?}"));
        let (name_labels, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value in {line:?}"));
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match name_labels.split_once('{') {
            None => (name_labels, Vec::new()),
            Some((n, rest)) => {
                (n, parse_labels(rest.strip_suffix('}').unwrap_or_else(|| panic!("{line:?}"))))
            }
        };
        assert!(is_name(name), "bad sample name in {line:?}");
        let suffixes: &[&str] = match ty.as_str() {
            "counter" => &["_total", "_created"],
            "histogram" => &["_bucket", "_count", "_sum", "_created"],
            "info" => &["_info"],
            _ => &[""],
        };
        assert!(
            suffixes.iter().any(|s| name.strip_prefix(fam.as_str()) == Some(s)),
            "sample {name} does not belong to family {fam} ({ty})"
        );
        let labels: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let key = series(name, &labels);
        assert!(out.insert(key.clone(), value).is_none(), "{key} twice");
    }
    out
}

fn parse_labels(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (k, after) = rest.split_once("=\"").unwrap_or_else(|| panic!("bad labels {s:?}"));
        assert!(is_name(k), "bad label name {k:?}");
        let mut v = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => v.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => v.push(c),
                    other => panic!("bad escape {other:?} in {s:?}"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => v.push(c),
                None => panic!("unterminated label value in {s:?}"),
            }
        };
        out.push((k.to_owned(), v));
        rest = after[end + 1..].strip_prefix(',').unwrap_or(&after[end + 1..]);
    }
    out
}

/// The Prometheus project's parser (Python `prometheus_client`), when its venv is there.
fn parse_with_prometheus(text: &str) -> Option<Samples> {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/py-venv-metrics/bin/python");
    if !python.exists() {
        assert!(
            std::env::var_os("KVBROKER_REQUIRE_PROM_PARSER").is_none(),
            "KVBROKER_REQUIRE_PROM_PARSER is set but {} is missing (.ci/run creates it)",
            python.display()
        );
        eprintln!("note: {} missing: only the strict Rust check parsed the metrics", python.display());
        return None;
    }
    const SCRIPT: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append([s.name, s.labels, s.value])
print(json.dumps(out))
"#;
    let mut child = Command::new(&python)
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client refused the metrics:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parsed: Vec<(String, BTreeMap<String, String>, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    let mut samples = Samples::new();
    for (name, labels, value) in parsed {
        let l: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        samples.insert(series(&name, &l), value);
    }
    Some(samples)
}

/// Parses a scrape both ways; they must agree.
fn parse(text: &str) -> Samples {
    let strict = parse_strict(text);
    if let Some(prom) = parse_with_prometheus(text) {
        assert_eq!(prom.keys().collect::<Vec<_>>(), strict.keys().collect::<Vec<_>>(), "series differ");
        for (k, v) in &prom {
            // Python re-derives sums; allow the last bits of a float to differ.
            assert!((v - strict[k]).abs() <= 1e-9 * v.abs().max(1.0), "{k}: {v} vs {}", strict[k]);
        }
    }
    strict
}

fn admin_socket(agent: &Agent) -> PathBuf {
    agent.dir.path().join("admin.sock")
}

/// `GET /metrics` on the admin socket: (content type, text).
fn scrape_admin(agent: &Agent) -> (String, String) {
    let (status, head, body) = raw_request(&admin_socket(agent), "GET", "/metrics", &[]).unwrap();
    assert_eq!(status, 200, "{head}\n{body}");
    (header(&head, "content-type"), body)
}

fn header(head: &str, name: &str) -> String {
    head.lines()
        .find_map(|l| {
            l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_default()
}

/// A raw request to the TCP listener: (status, head, body).
fn tcp_request(addr: &str, request: &str) -> (u16, String, String) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}

fn scrape_tcp(addr: &str) -> String {
    let (status, head, body) = tcp_request(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    assert_eq!(status, 200, "{head}");
    assert!(header(&head, "content-type").starts_with("application/openmetrics-text"), "{head}");
    body
}

/// A loopback port free right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn delta(before: &Samples, after: &Samples, name: &str, labels: &[(&str, &str)]) -> f64 {
    let k = series(name, labels);
    let a = *after.get(&k).unwrap_or_else(|| panic!("no series {k} after"));
    a - before.get(&k).copied().unwrap_or(0.0)
}

fn get_json(agent: &Agent, path: &str) -> (u16, Value) {
    let (s, body) = raw_get(&agent.socket, path, &[]).unwrap();
    (s, serde_json::from_str(&body).unwrap_or(Value::Null))
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 16: there was no metric at all. Reads, misses, denials, not-found and rate-limit
/// refusals each move their counters by exactly what happened, on the admin socket and the
/// TCP listener alike; no value and no caller-chosen name ever appears in the text.
#[test]
fn counters_move_by_what_happened_and_hold_no_value_or_caller_string() {
    let value = canary("metrics");
    let probe = "caller-chosen-name-7f3a";
    let addr = format!("127.0.0.1:{}", free_port());
    let agent = Agent::builder("metrics")
        .secret("db-password", &value)
        .rule("name = \"db\"\nuids = [0]\nsecrets = [\"default/db-*\"]")
        .limits("rate_per_second = 1\nburst = 12")
        .section(&format!("[metrics]\nlisten = \"{addr}\""))
        .start();
    let (ctype, text) = scrape_admin(&agent);
    assert_eq!(ctype, "application/openmetrics-text; version=1.0.0; charset=utf-8");
    let before = parse(&text);
    assert_eq!(before[&series("kvbroker_build_info", &[("version", env!("CARGO_PKG_VERSION"))])], 1.0);

    for _ in 0..3 {
        assert_eq!(run(kvb(&agent.socket, None).args(["get", "db-password"])).1, value);
    }
    for _ in 0..2 {
        let (code, _, err) = run(kvb(&agent.socket, None).args(["get", probe]));
        assert_eq!(code, 3, "{err}");
    }
    let (_, missing, _) = curl(&agent.socket, "/v1/secrets/db-missing", None, &[]);
    assert!(missing.ends_with("\n404"), "{missing}");

    let admin_text = scrape_admin(&agent).1;
    let tcp_text = scrape_tcp(&addr);
    for text in [&admin_text, &tcp_text] {
        let after = parse(text);
        let d = |name: &str, labels: &[(&str, &str)]| delta(&before, &after, name, labels);
        let reads = "kvbroker_secret_reads_total";
        assert_eq!(d(reads, &[("outcome", "allowed"), ("cache", "miss")]), 1.0);
        assert_eq!(d(reads, &[("outcome", "allowed"), ("cache", "hit")]), 2.0);
        assert_eq!(d(reads, &[("outcome", "denied"), ("cache", "none")]), 2.0);
        assert_eq!(d(reads, &[("outcome", "error"), ("cache", "none")]), 1.0);
        assert_eq!(d("kvbroker_denials_total", &[("reason", "policy")]), 2.0);
        assert_eq!(d("kvbroker_secret_read_errors_total", &[("code", "PermissionDenied")]), 2.0);
        assert_eq!(d("kvbroker_secret_read_errors_total", &[("code", "SecretNotFound")]), 1.0);
        assert_eq!(d("kvbroker_vault_calls_total", &[("vault", "default"), ("status", "ok")]), 1.0);
        assert_eq!(d("kvbroker_vault_calls_total", &[("vault", "default"), ("status", "not_found")]), 1.0);
        assert_eq!(d("kvbroker_vault_call_duration_seconds_count", &[("vault", "default")]), 2.0);
        // Three allowed reads with their own records; the refusals too (within the budget).
        assert!(d("kvbroker_audit_records_total", &[]) >= 6.0, "{text}");
        assert!(d("kvbroker_audit_bytes_total", &[]) > 6.0 * 200.0);
        assert_eq!(d("kvbroker_audit_write_failures_total", &[]), 0.0);
        assert_eq!(after[&series("kvbroker_cache_entries", &[])], 1.0, "db-password (a 404 caches nothing)");
        assert_eq!(after[&series("kvbroker_cache_stale_entries", &[])], 0.0);
        assert!(!text.contains(&value), "a value in the metrics");
        assert!(!text.contains(probe), "a caller-chosen name in the metrics");
        assert!(!text.contains("db-password"), "secret names are labels only with per_secret");
    }

    // An idle connection shows as idle while it is open.
    let held = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    wait_for("the held connection to be counted idle", Duration::from_secs(5), || {
        parse(&scrape_tcp(&addr))[&series("kvbroker_connections", &[("state", "idle")])] == 1.0
    });
    drop(held);
    wait_for("the closed connection to leave the gauge", Duration::from_secs(5), || {
        parse(&scrape_tcp(&addr))[&series("kvbroker_connections", &[("state", "idle")])] == 0.0
    });

    // Rate limit: the burst of 12 is nearly spent; every 429 is counted, under `rate`.
    let before = parse(&scrape_admin(&agent).1);
    let mut refused = 0;
    for _ in 0..12 {
        let (_, out, _) = curl(&agent.socket, "/v1/secrets/db-password", None, &[]);
        if out.ends_with("\n429") {
            refused += 1;
        } else {
            assert!(out.ends_with("\n200"), "{out}");
        }
    }
    assert!(refused >= 1, "the rate limit never refused");
    let after = parse(&scrape_tcp(&addr));
    assert_eq!(
        delta(&before, &after, "kvbroker_rate_limited_total", &[("limit", "rate")]),
        f64::from(refused)
    );
    assert_eq!(
        delta(&before, &after, "kvbroker_secret_read_errors_total", &[("code", "TooManyRequests")]),
        f64::from(refused)
    );

    // The TCP listener serves nothing but GET /metrics.
    assert_eq!(tcp_request(&addr, "GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n").0, 404);
    assert_eq!(tcp_request(&addr, "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").0, 405);
    agent.assert_no_canary(&[&value], &[&admin_text, &tcp_text]);
}

/// With `per_secret`, allowed reads are counted per secret, in the vault's spelling (lowercase);
/// a denied caller-chosen name still never becomes a label.
#[test]
fn per_secret_counts_only_served_names() {
    let value = canary("persecret");
    let agent = Agent::builder("persecret")
        .secret("Db-Password", &value)
        .rule("name = \"db\"\nuids = [0]\nsecrets = [\"default/db-*\"]")
        .section("[metrics]\nper_secret = true")
        .start();
    let probe = "probe-name-not-allowed";
    assert_eq!(run(kvb(&agent.socket, None).args(["get", "DB-PASSWORD"])).1, value);
    assert_eq!(run(kvb(&agent.socket, None).args(["get", probe])).0, 3);
    let text = scrape_admin(&agent).1;
    let m = parse(&text);
    assert_eq!(
        m[&series("kvbroker_secret_reads_by_name_total", &[("vault", "default"), ("secret", "db-password")])],
        1.0
    );
    assert!(!text.contains(probe) && !text.contains(&value), "{text}");
    agent.assert_no_canary(&[&value], &[&text]);
}

/// Metrics on a non-loopback address would be readable from the network: refused by
/// check-config and by run, unless `allow_remote = true` (checked without binding: tests
/// never listen beyond loopback).
#[test]
fn non_loopback_metrics_listen_is_refused_unless_allowed() {
    let b = Agent::builder("remote")
        .secret("s", "x")
        .allow_uid(0)
        .section("[metrics]\nlisten = \"0.0.0.0:9464\"");
    let config = b.write();
    let (code, out, err) = run(Command::new(bin("kvbroker")).args(["check-config", "--config"]).arg(&config));
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("[metrics] listen 0.0.0.0:9464 is not a loopback address")
            && err.contains("allow_remote = true"),
        "{err}"
    );
    let (code, _, err) = run(Command::new(bin("kvbroker")).args(["run", "--config"]).arg(&config));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is not a loopback address"), "{err}");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("listen = \"0.0.0.0:9464\"", "listen = \"0.0.0.0:9464\"\nallow_remote = true");
    std::fs::write(&config, text).unwrap();
    let (code, out, err) = run(Command::new(bin("kvbroker")).args(["check-config", "--config"]).arg(&config));
    assert_eq!(code, 0, "{out}{err}");
}

/// Issue 16: health said "ok" while the vault was down and values went stale. Now: degraded
/// with the stale value and, after `max_stale`, with the failing vault; the metrics agree; both
/// clear once the vault answers again.
#[test]
fn health_degrades_while_the_vault_fails_and_recovers() {
    let value = canary("vaultdown");
    let emu = EmulatorProc::start(&[("s", &value)]);
    let agent = Agent::builder("vaultdown")
        .keyvault(&emu, "azure-ml")
        .allow_uid(0)
        .vault_extra("deadline = \"1s\"")
        .cache("refresh_interval = \"1s\"\nmax_stale = \"3s\"")
        .start();
    assert_eq!(get_json(&agent, "/v1/secrets/s").0, 200);
    assert_eq!(get_json(&agent, "/v1/health").0, 200);
    let before = parse(&scrape_admin(&agent).1);
    emu.fault(&Fault { status: Some(503), ..Fault::default() });
    wait_for("health to report the stale value", Duration::from_secs(5), || {
        get_json(&agent, "/v1/health").1["reasons"].to_string().contains("served stale")
    });
    wait_for("health to report the failing vault", Duration::from_secs(10), || {
        get_json(&agent, "/v1/health").1["reasons"]
            .to_string()
            .contains("vault default has had no successful fetch")
    });
    let (s, h) = get_json(&agent, "/v1/health");
    assert_eq!((s, h["status"].as_str()), (503, Some("degraded")), "{h}");
    assert_eq!(get_json(&agent, "/v1/health?ready").0, 200, "stale values are still served: ready");
    // Reads in the stale period: served stale until max_stale, 502 after; each counted so.
    let mid = parse(&scrape_admin(&agent).1);
    let (mut stale, mut unavailable) = (0, 0);
    for _ in 0..5 {
        match get_json(&agent, "/v1/secrets/s") {
            (200, v) if v["stale"] == true => stale += 1,
            (502, v) if v["error"]["code"] == "UpstreamUnavailable" => unavailable += 1,
            other => panic!("neither stale nor 502: {other:?}"),
        }
    }
    let during = parse(&scrape_admin(&agent).1);
    assert!(
        delta(
            &before,
            &during,
            "kvbroker_vault_calls_total",
            &[("vault", "default"), ("status", "unavailable")]
        ) >= 1.0
    );
    assert!(during[&series("kvbroker_vault_failing_seconds", &[("vault", "default")])] >= 3.0);
    assert_eq!(during[&series("kvbroker_cache_stale_entries", &[])], 1.0);
    let reads = "kvbroker_secret_reads_total";
    assert_eq!(delta(&mid, &during, reads, &[("outcome", "allowed"), ("cache", "stale")]), f64::from(stale));
    assert_eq!(
        delta(&mid, &during, reads, &[("outcome", "error"), ("cache", "none")]),
        f64::from(unavailable)
    );
    assert_eq!(
        delta(&mid, &during, "kvbroker_secret_read_errors_total", &[("code", "UpstreamUnavailable")]),
        f64::from(unavailable)
    );

    emu.clear_faults();
    wait_for("health to recover", Duration::from_secs(10), || get_json(&agent, "/v1/health").0 == 200);
    let after = parse(&scrape_admin(&agent).1);
    assert_eq!(after[&series("kvbroker_vault_failing_seconds", &[("vault", "default")])], 0.0);
    assert_eq!(after[&series("kvbroker_cache_stale_entries", &[])], 0.0);
    assert!(
        after[&series("kvbroker_token_acquisitions_total", &[("source", "azure-ml"), ("result", "ok")])]
            >= 1.0
    );
    agent.assert_no_canary(&[&value], &[]);
}

/// The audit log cannot be written (its path replaced by a directory): reads fail closed,
/// health and readiness say degraded, each failure is counted; all clear once it can be.
#[test]
fn broken_audit_log_degrades_health_and_is_counted() {
    let value = canary("auditbroken");
    let agent = Agent::builder("auditbroken").secret("s", &value).allow_uid(0).start();
    let (s, ready) = get_json(&agent, "/v1/health?ready");
    assert_eq!((s, ready["status"].as_str()), (200, Some("ready")), "{ready}");
    assert_eq!(get_json(&agent, "/v1/health?bogus").0, 400);
    assert_eq!(get_json(&agent, "/v1/secrets/s").0, 200);
    let before = parse(&scrape_admin(&agent).1);

    std::fs::remove_file(&agent.audit).unwrap();
    std::fs::create_dir(&agent.audit).unwrap();
    let mut failed = 0;
    for _ in 0..3 {
        let (s, v) = get_json(&agent, "/v1/secrets/s");
        assert_eq!((s, v["error"]["code"].as_str()), (503, Some("AuditUnavailable")), "{v}");
        failed += 1;
    }
    let (s, h) = get_json(&agent, "/v1/health");
    assert_eq!((s, h["status"].as_str()), (503, Some("degraded")));
    assert!(h["reasons"].to_string().contains("is not writable"), "{h}");
    let (s, ready) = get_json(&agent, "/v1/health?ready");
    assert_eq!((s, ready["status"].as_str()), (503, Some("degraded")), "{ready}");
    let text = scrape_admin(&agent).1;
    let during = parse(&text);
    assert_eq!(delta(&before, &during, "kvbroker_audit_write_failures_total", &[]), f64::from(failed));
    assert_eq!(
        delta(&before, &during, "kvbroker_secret_read_errors_total", &[("code", "AuditUnavailable")]),
        f64::from(failed)
    );
    assert_eq!(
        delta(&before, &during, "kvbroker_secret_reads_total", &[("outcome", "error"), ("cache", "none")]),
        f64::from(failed)
    );
    assert_eq!(
        delta(&before, &during, "kvbroker_secret_reads_total", &[("outcome", "allowed"), ("cache", "hit")]),
        0.0
    );

    std::fs::remove_dir(&agent.audit).unwrap();
    wait_for("reads to work again", Duration::from_secs(5), || get_json(&agent, "/v1/secrets/s").0 == 200);
    assert_eq!(get_json(&agent, "/v1/health").0, 200);
    assert_eq!(get_json(&agent, "/v1/health?ready").0, 200);
    agent.assert_no_canary(&[&value], &[&text]);
}

/// `[log] format = "json"`: every line on stderr is one JSON object with the usual fields,
/// and none holds the value.
#[test]
fn json_logs_parse_line_by_line_and_hold_no_value() {
    let value = canary("jsonlog");
    let mut agent = Agent::builder("jsonlog")
        .secret("s", &value)
        .allow_uid(0)
        .section("[log]\nformat = \"json\"\nlevel = \"debug\"")
        .start();
    assert_eq!(run(kvb(&agent.socket, None).args(["get", "s"])).1, value);
    assert_eq!(run(kvb(&agent.socket, None).args(["get", "nope"])).0, 1, "not found");
    assert!(agent.stop().success());
    let out = agent.output();
    let mut messages = Vec::new();
    for line in out.lines() {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
        assert!(v["timestamp"].is_string() && v["level"].is_string() && v["target"].is_string(), "{line}");
        messages.push(v["message"].as_str().unwrap_or("").to_owned());
    }
    assert!(messages.iter().any(|m| m == "kvbroker agent ready"), "{out}");
    assert!(messages.iter().any(|m| m == "secret read decided"), "debug level applies: {out}");
    assert!(messages.iter().any(|m| m == "kvbroker agent stopped"), "{out}");
    agent.assert_no_canary(&[&value], &[]);
}

/// `?ready` in `kvbroker launch`: 503 "starting" while `--prefetch` waits for the vault (a
/// readiness probe must not send work yet), 200 "ready" once the command runs; plain health
/// is not held back (liveness).
#[test]
fn launch_is_not_ready_until_prefetch_is_done() {
    let value = canary("ready");
    let job = crate::launch::Job::new("ready", &[("s", &value)]);
    job.emu.fault(&Fault { latency_ms: Some(3000), count: Some(1), ..Fault::default() });
    let runtime = kvbroker_tests::TempDir::new("ready-xdg");
    let script = "curl -s --unix-socket \"$KVBROKER_SOCKET\" http://x/v1/health?ready > \"$OUT/ready.json\"";
    let mut cmd = job.command(&["--prefetch", "s"], script);
    cmd.env("XDG_RUNTIME_DIR", runtime.path()).stdout(Stdio::null()).stderr(Stdio::null());
    let mut launched = kvbroker_tests::Proc::spawn(&mut cmd);
    let mut socket = None;
    wait_for("the launch socket", Duration::from_secs(10), || {
        socket = std::fs::read_dir(runtime.path())
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path().join("agent.sock"))
            .find(|p| p.exists());
        socket.is_some()
    });
    let socket = socket.unwrap();
    let (s, body) = raw_get(&socket, "/v1/health?ready", &[]).unwrap();
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((s, v["status"].as_str()), (503, Some("starting")), "{body}");
    assert!(v["reasons"].to_string().contains("prefetched"), "{body}");
    assert_eq!(raw_get(&socket, "/v1/health", &[]).unwrap().0, 200, "liveness is not held back");
    let status = launched.wait_timeout(Duration::from_secs(30)).expect("launch did not finish");
    assert!(status.success(), "{status}");
    let ready: Value =
        serde_json::from_str(&std::fs::read_to_string(job.out().join("ready.json")).unwrap()).unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");
}

/// The TCP listener cannot be used to pin the agent's fds: it holds at most 16 connections
/// (more are closed at once), drops one that sends no request head within 5 s, and serves
/// again as soon as room frees.
#[test]
fn metrics_listener_is_bounded_and_times_out_idle_connections() {
    let addr = format!("127.0.0.1:{}", free_port());
    let agent = Agent::builder("metricsbound")
        .secret("s", "x")
        .allow_uid(0)
        .section(&format!("[metrics]\nlisten = \"{addr}\""))
        .start();
    let started = Instant::now();
    let held: Vec<_> = (0..16).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    // Wait until all 16 are accepted (the 17th is then closed by the agent, not queued).
    wait_for("a 17th connection to be closed at once", Duration::from_secs(4), || {
        let mut extra = std::net::TcpStream::connect(&addr).unwrap();
        extra.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
        let _ = extra.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut buf = [0u8; 64];
        match extra.read(&mut buf) {
            Ok(0) => true,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
            Ok(_) => false,
        }
    });
    // The idle ones are dropped after the head timeout; then scrapes work again.
    for mut c in held {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut buf = [0u8; 64];
        let n = c.read(&mut buf).unwrap_or(0);
        assert!(
            n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"),
            "idle connection answered"
        );
    }
    assert!(started.elapsed() >= Duration::from_secs(4), "closed by the 5 s head timeout, not at once");
    parse(&scrape_tcp(&addr));
    drop(agent);
}

/// Issue 16: a background task that died was shown only by a unit test. Here a real agent's
/// refresher panics on its first run (fault injection, debug builds only): health degrades
/// naming the task, the refresher is restarted and picks up a rotation, the agent serves
/// throughout, and health recovers once the death is older than the degraded period.
#[test]
fn a_dead_background_task_degrades_health_until_it_is_back() {
    let (v1, v2) = (canary("taskdied1"), canary("taskdied2"));
    let emu = EmulatorProc::start(&[("s", &v1)]);
    let agent = Agent::builder("taskdied")
        .keyvault(&emu, "azure-ml")
        .allow_uid(0)
        .cache("refresh_interval = \"1s\"")
        .env("KVBROKER_TEST_PANIC_TASK", "refresher")
        .env("KVBROKER_TEST_DEGRADED_FOR_MS", "4000")
        .start();
    let value = |agent: &Agent| get_json(agent, "/v1/secrets/s").1["value"].as_str().unwrap_or("").to_owned();
    assert_eq!(value(&agent), v1);
    let reasons = || get_json(&agent, "/v1/health").1["reasons"].to_string();
    wait_for("health to name the dead refresher", Duration::from_secs(10), || {
        reasons().contains("background task refresher panicked: injected by KVBROKER_TEST_PANIC_TASK")
    });
    let (s, h) = get_json(&agent, "/v1/health");
    assert_eq!((s, h["status"].as_str()), (503, Some("degraded")), "{h}");
    assert_eq!(value(&agent), v1, "reads are served while a background task is down");
    // The restarted refresher does its job: a rotation reaches readers.
    emu.set_secret("s", &v2, serde_json::json!({}));
    wait_for("the restarted refresher to pick up the rotation", Duration::from_secs(15), || {
        value(&agent) == v2
    });
    wait_for("health to recover", Duration::from_secs(15), || get_json(&agent, "/v1/health").0 == 200);
    assert!(agent.output().contains("background task died; restarting it"), "the death is logged");
    agent.assert_no_canary(&[&v1, &v2], &[]);
}
