//! Reading secrets: allowed, denied, errors, and the answer formats.

use std::os::unix::fs::PermissionsExt;

use kvbroker_tests::{Agent, canary, curl, kvb, raw_request, run};
use serde_json::Value;

const NOBODY: u32 = 65534;

fn body_json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// The client crate, kvb and curl all read the same value; nothing leaks it.
#[test]
fn allowed_read_through_client_kvb_and_curl() {
    let value = canary("read");
    let agent = Agent::builder("read").secret("Db-Password", &value).allow_uid(0).start();
    let sock = agent.socket.clone();

    // Async client, with the name in another case.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = kvbroker_client::Client::builder().socket(&sock).build();
    let s = rt.block_on(client.get("DB-PASSWORD")).unwrap();
    assert_eq!(s.expose_secret(), value.as_bytes());
    assert_eq!(s.name(), "Db-Password");
    assert_eq!(s.vault(), "default");
    assert_eq!(s.version().len(), 32);
    assert!(!s.is_stale());
    let debug = format!("{s:?}");
    assert!(debug.contains("redacted"), "{debug}");
    // Kept-alive connection: a second read on the same client.
    let again = rt.block_on(client.get("db-password")).unwrap();
    assert_eq!(again.version(), s.version());

    // Blocking client, pinned to the version just read.
    let blocking = kvbroker_client::blocking::Client::with_socket(&sock).unwrap();
    let opts = kvbroker_client::GetOptions::default().version(s.version()).vault("default");
    let b = blocking.get_with("db-password", &opts).unwrap();
    assert_eq!(b.expose_secret(), value.as_bytes());

    // kvb get to stdout, and to a 0600 file.
    let (code, out, err) = run(kvb(&sock, None).args(["get", "db-password"]));
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(out, value);
    let file = agent.dir.path().join("out/pw");
    std::fs::create_dir(agent.dir.path().join("out")).unwrap();
    let (code, _, err) = run(kvb(&sock, None).args(["get", "db-password", "-o"]).arg(&file));
    assert_eq!((code, err.as_str()), (0, ""));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), value);
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);

    // kvb exec puts the value in the child's environment only.
    let (code, out, err) = run(kvb(&sock, None)
        .args([
            "exec",
            "--env",
            "DB_PW=db-password",
            "--",
            "sh",
            "-c",
            "[ \"$DB_PW\" = \"$WANT\" ] && echo same",
        ])
        .env("WANT", &value));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "same\n", ""));

    // curl: JSON, with the headers every answer carries.
    let (code, out, _) = curl(&sock, "/v1/secrets/db-password", None, &[]);
    assert_eq!(code, 0);
    let (body, status) = out.rsplit_once('\n').unwrap();
    assert_eq!(status, "200");
    let v = body_json(body);
    assert_eq!(v["value"], value.as_str());
    assert_eq!(v["stale"], false);
    for key in ["vault", "name", "version", "content_type", "not_before", "expires_on", "fetched_at"] {
        assert!(v.get(key).is_some(), "missing {key} in {v}");
    }
    let (status, head, _) = raw_request(&sock, "GET", "/v1/secrets/db-password", &[]).unwrap();
    assert_eq!(status, 200);
    let head = head.to_ascii_lowercase();
    assert!(head.contains("\r\ncache-control: no-store"), "{head}");
    assert!(head.contains("\r\nx-request-id: "), "{head}");

    agent.assert_no_canary(&[&value], &[&err, &debug]);
}

/// `Accept: application/octet-stream` gets the raw bytes, metadata in headers.
#[test]
fn octet_stream_answer_is_the_raw_value() {
    let value = canary("raw");
    let agent = Agent::builder("raw").secret("api-token", &value).allow_uid(0).start();
    let (status, head, body) =
        raw_request(&agent.socket, "GET", "/v1/secrets/api-token", &[("Accept", "application/octet-stream")])
            .unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, value);
    let head = head.to_ascii_lowercase();
    assert!(head.contains("content-type: application/octet-stream"), "{head}");
    assert!(head.contains("x-secret-name: api-token"), "{head}");
    assert!(head.contains("x-secret-version: "), "{head}");
    assert!(head.contains("cache-control: no-store"), "{head}");
    agent.assert_no_canary(&[&value], &[&head]);
}

/// Another uid is denied, with the same answer whether or not the secret exists, and kvb
/// exits 3 with the agent's reason.
#[test]
fn denies_other_uid_identically_for_existing_and_missing_secrets() {
    let value = canary("deny");
    let agent = Agent::builder("deny").secret("db-password", &value).allow_uid(0).socket_mode("0666").start();
    let sock = &agent.socket;

    let (code, out, err) = run(kvb(sock, Some(NOBODY)).args(["get", "db-password"]));
    assert_eq!((code, out.as_str()), (3, ""));
    assert!(err.starts_with("kvb: no rule allows uid 65534 (exe "), "{err}");

    let strip_id = |out: &str| {
        let (body, status) = out.rsplit_once('\n').unwrap();
        let mut v = body_json(body);
        v["error"]["request_id"] = Value::Null;
        (status.to_owned(), v)
    };
    let (_, exists, _) = curl(sock, "/v1/secrets/db-password", Some(NOBODY), &[]);
    let (_, missing, _) = curl(sock, "/v1/secrets/no-such-secret", Some(NOBODY), &[]);
    let (s1, v1) = strip_id(&exists);
    let (s2, mut v2) = strip_id(&missing);
    assert_eq!((s1.as_str(), s2.as_str()), ("403", "403"));
    assert_eq!(v1["error"]["code"], "PermissionDenied");
    let m1 = v1["error"]["message"].as_str().unwrap().to_owned();
    assert!(m1.starts_with("no rule allows uid 65534 (exe "), "{m1}");
    // The messages differ only in the name asked for.
    assert_eq!(v2["error"]["message"], m1.replace("db-password", "no-such-secret"));
    v2["error"]["message"] = v1["error"]["message"].clone();
    assert_eq!(v1, v2);

    let denied: Vec<Value> = agent
        .audit_records()
        .into_iter()
        .filter(|r| r["event"] == "secret.read" && r["outcome"] == "denied")
        .collect();
    assert_eq!(denied.len(), 3);
    assert!(denied.iter().all(|r| r["peer"]["uid"] == NOBODY && r["reason"] == "no rule matches"));
    agent.assert_no_canary(&[&value], &[&err, &exists, &missing]);
}

/// Each error of SPEC.md's table that a local agent can produce, with its status and code.
#[test]
fn errors_have_the_spec_status_and_code() {
    let value = canary("err");
    let agent = Agent::builder("err")
        .secret("ok", &value)
        .secret_with("expired", &value, "expires_on = \"2001-01-01T00:00:00Z\"")
        .secret_with("future", &value, "not_before = \"2099-01-01T00:00:00Z\"")
        .secret_with("off", &value, "enabled = false")
        .allow_uid(0)
        .start();
    let sock = &agent.socket;
    type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], u16, &'a str);
    let cases: &[Case<'_>] = &[
        ("GET", "/v1/secrets/nope", &[], 404, "SecretNotFound"),
        ("GET", "/v1/secrets/bad_name", &[], 400, "InvalidRequest"),
        ("GET", &*format!("/v1/secrets/{}", "a".repeat(128)), &[], 400, "InvalidRequest"),
        ("GET", "/v1/secrets/ok?version=123", &[], 400, "InvalidRequest"),
        ("GET", "/v1/secrets/ok?colour=blue", &[], 400, "InvalidRequest"),
        ("GET", "/v1/secrets/ok?vault=elsewhere", &[], 400, "InvalidRequest"),
        ("GET", "/v1/secrets/ok?version=0123456789abcdef0123456789abcdef", &[], 404, "SecretNotFound"),
        ("GET", "/v1/nothing", &[], 404, "NotFound"),
        ("POST", "/v1/secrets/ok", &[("Content-Length", "0")], 405, "MethodNotAllowed"),
        ("GET", "/v1/secrets/ok", &[("Content-Length", "5")], 413, "PayloadTooLarge"),
        ("GET", "/v1/secrets/expired", &[], 422, "SecretNotUsable"),
        ("GET", "/v1/secrets/future", &[], 422, "SecretNotUsable"),
        ("GET", "/v1/secrets/off", &[], 422, "SecretNotUsable"),
    ];
    let mut seen = String::new();
    for (method, path, headers, status, code) in cases {
        let (s, head, body) = raw_request(sock, method, path, headers).unwrap();
        assert_eq!(s, *status, "{method} {path}: {body}");
        let v = body_json(&body);
        assert_eq!(v["error"]["code"], *code, "{method} {path}: {body}");
        let rid = v["error"]["request_id"].as_str().unwrap();
        assert!(head.to_ascii_lowercase().contains(&format!("x-request-id: {rid}")), "{head}");
        seen.push_str(&body);
    }
    let msg =
        |path: &str| body_json(&raw_request(sock, "GET", path, &[]).unwrap().2)["error"]["message"].clone();
    assert_eq!(
        msg("/v1/secrets/expired"),
        "secret expired in vault default is not usable: expired (exp 2001-01-01T00:00:00Z)"
    );
    assert_eq!(
        msg("/v1/secrets/future"),
        "secret future in vault default is not usable: not yet valid (nbf 2099-01-01T00:00:00Z)"
    );
    assert_eq!(msg("/v1/secrets/off"), "secret off in vault default is not usable: disabled");

    // kvb: not found exits 1; a bad name is refused before asking (usage, 2).
    let (code, out, err) = run(kvb(sock, None).args(["get", "nope"]));
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.starts_with("kvb: secret nope not found in vault default (request "), "{err}");
    let (code, _, err) = run(kvb(sock, None).args(["get", "bad_name"]));
    assert_eq!(code, 2);
    assert_eq!(
        err,
        "kvb: invalid request: invalid secret name: use 1 to 127 characters of 0-9, a-z, A-Z and '-' (request -)\n"
    );
    // No agent at all: exit 1 naming the socket.
    let gone = agent.dir.path().join("nowhere.sock");
    let (code, _, err) = run(kvb(&gone, None).args(["get", "ok"]));
    assert_eq!(code, 1);
    assert!(err.starts_with(&format!("kvb: kvbroker agent not reachable at {}: ", gone.display())), "{err}");
    agent.assert_no_canary(&[&value], &[&seen, &err]);
}

/// Issue 19's plain path and hyper on one connection: two plain GETs written at once (one
/// with an `Accept` for the raw value), then a HEAD (hyper's from there on), then a plain
/// GET that hyper now serves, then `Connection: close`. Every answer comes, in order, with
/// the same headers whichever path wrote it, and the connection closes after the last.
#[test]
fn plain_reads_and_hyper_share_a_connection_in_order() {
    use std::io::{Read, Write};
    let value = canary("plain");
    let agent = Agent::builder("plain").secret("s", &value).allow_uid(0).start();
    let mut c = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let get = "GET /v1/secrets/s HTTP/1.1\r\nHost: x\r\n\r\n";
    let raw = "GET /v1/secrets/s HTTP/1.1\r\nHost: x\r\nAccept: application/octet-stream\r\n\r\n";
    let head = "HEAD /v1/secrets/s HTTP/1.1\r\nHost: x\r\n\r\n";
    let close = "GET /v1/secrets/s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    // The raw answer first: the JSON answer after it on the plain path must not carry any of
    // its `X-Secret-*` headers (answers' header maps are reused per thread).
    c.write_all(format!("{raw}{get}").as_bytes()).unwrap();
    // Both answers before the next write, so the HEAD is read on its own.
    let mut got = Vec::new();
    let mut buf = [0u8; 8192];
    while got.windows(value.len()).filter(|w| *w == value.as_bytes()).count() < 2 {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    c.write_all(format!("{head}{get}{close}").as_bytes()).unwrap();
    c.read_to_end(&mut got).unwrap();
    let text = String::from_utf8(got).unwrap();
    let answers: Vec<&str> = text.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 5, "{text}");
    let status: Vec<&str> = answers.iter().map(|a| &a[..3]).collect();
    assert_eq!(status, ["200", "200", "405", "200", "200"], "{text}");
    for (i, a) in answers.iter().enumerate() {
        let lower = a.to_ascii_lowercase();
        for h in ["\r\nx-request-id: ", "\r\ncache-control: no-store", "\r\ncontent-length: ", "\r\ndate: "] {
            assert!(lower.contains(h), "answer {i} lacks {h:?}: {a}");
        }
    }
    let json_answers = [answers[1], answers[3], answers[4]];
    for a in json_answers {
        let (head, body) = a.split_once("\r\n\r\n").unwrap();
        assert_eq!(body_json(body)["value"], value.as_str());
        assert!(
            !head.to_ascii_lowercase().contains("\r\nx-secret-"),
            "a raw answer's header carried over: {a}"
        );
    }
    assert!(answers[0].to_ascii_lowercase().contains("content-type: application/octet-stream"));
    assert!(answers[0].to_ascii_lowercase().contains("\r\nx-secret-version: "), "{}", answers[0]);
    assert!(answers[0].ends_with(&value), "{}", answers[0]);
    let recs: Vec<Value> =
        agent.audit_records().into_iter().filter(|r| r["event"] == "secret.read").collect();
    // The HEAD is refused by route (405) before any decision: four reads decided, four records.
    assert_eq!(recs.len(), 4, "{recs:?}");
    assert!(recs.iter().all(|r| r["outcome"] == "allowed"), "{recs:?}");
    agent.assert_no_canary(&[&value], &[]);
}

/// A malformed head of a few KiB written at once is answered 400 at once (with a 1 KiB
/// first read, hyper got such a head in two reads and stayed silent until the header
/// timeout), and the answer is SPEC's like any other: JSON `InvalidRequest` with the
/// parser's reason and no byte of the head, `X-Request-Id` (matching the body's),
/// `Cache-Control: no-store`; then the connection is closed. Also after a plain read on the
/// same connection. (Hyper's own 400 carried none of these.)
#[test]
fn a_malformed_head_of_a_few_kib_is_answered_400_at_once() {
    use std::io::{Read, Write};
    let agent = Agent::builder("plain-bad").secret("s", "v").allow_uid(0).start();
    let read_all = |c: &mut std::os::unix::net::UnixStream, what: &str| {
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap_or_else(|e| panic!("{what}: no answer, or not closed: {e}"));
        String::from_utf8(got).unwrap()
    };
    for (len, first) in [(10, false), (700, false), (2500, false), (10, true)] {
        let mut c = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
        c.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
        let secret_marker = "zq7secretpathmarker";
        let head =
            format!("GET /{}{secret_marker} HTTP/1.1\rHost: k\rConnection: close\r\r", "v1/".repeat(len));
        let what = format!("{} bytes, after a read: {first}", head.len());
        let mut sent = Vec::new();
        if first {
            sent.extend_from_slice(b"GET /v1/secrets/s HTTP/1.1\r\nHost: k\r\n\r\n");
        }
        sent.extend_from_slice(head.as_bytes());
        c.write_all(&sent).unwrap();
        let got = read_all(&mut c, &what);
        let bad = if first {
            let (ok, rest) =
                got.split_at(got.find("HTTP/1.1 400 ").unwrap_or_else(|| panic!("{what}: {got}")));
            assert!(ok.starts_with("HTTP/1.1 200 "), "{what}: {ok}");
            rest.to_owned()
        } else {
            got
        };
        assert!(bad.starts_with("HTTP/1.1 400 "), "{what}: {bad}");
        let (h, body) = bad.split_once("\r\n\r\n").unwrap();
        let h = h.to_ascii_lowercase();
        assert!(h.contains("\r\ncache-control: no-store"), "{what}: {h}");
        assert!(h.contains("\r\nconnection: close"), "{what}: {h}");
        let body: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: {e}: {body}"));
        assert_eq!(body["error"]["code"], "InvalidRequest", "{what}");
        let id = body["error"]["request_id"].as_str().unwrap();
        assert_eq!(id.len(), 32, "{what}: {body}");
        assert!(h.contains(&format!("\r\nx-request-id: {id}")), "{what}: {h}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("not valid HTTP/1.1"), "{what}: {message}");
        assert!(!message.contains(secret_marker) && !h.contains(secret_marker), "{what}: the head is echoed");
    }
}

/// A kept-alive connection with no request for 10–20 s is closed by the agent, as hyper
/// closed an idle one after 10 s, so idle connections do not pile up across uids; one that
/// keeps reading stays open.
#[test]
fn an_idle_kept_alive_connection_is_closed_after_its_idle_limit() {
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};
    let agent = Agent::builder("plain-idle").secret("s", "v").allow_uid(0).start();
    let get = b"GET /v1/secrets/s HTTP/1.1\r\nHost: x\r\n\r\n";
    let read_answer = |c: &mut std::os::unix::net::UnixStream| {
        let mut buf = [0u8; 4096];
        let n = c.read(&mut buf).unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 "), "{}", String::from_utf8_lossy(&buf[..n]));
    };
    let mut idle = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    let mut busy = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
    for c in [&mut idle, &mut busy] {
        c.write_all(get).unwrap();
        read_answer(c);
    }
    idle.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let started = Instant::now();
    // The busy connection reads every 2 s meanwhile; the idle one sends nothing.
    let busy_thread = std::thread::spawn(move || {
        for _ in 0..12 {
            std::thread::sleep(Duration::from_secs(2));
            busy.write_all(get).unwrap();
            read_answer(&mut busy);
        }
    });
    let mut buf = [0u8; 16];
    let n = idle.read(&mut buf).unwrap();
    let took = started.elapsed();
    assert_eq!(n, 0, "closed, not answered");
    assert!((Duration::from_secs(9)..Duration::from_secs(25)).contains(&took), "closed after {took:?}");
    busy_thread.join().expect("the connection that kept reading stayed open");
}
