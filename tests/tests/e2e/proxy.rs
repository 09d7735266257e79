//! Issue 15: enterprise and locked-down Azure ML networks force egress through an HTTP
//! proxy. Key Vault and Entra go through HTTP CONNECT; identity endpoints never do.
//!
//! The proxy here is a few lines on 127.0.0.1: it reads one CONNECT, checks the
//! credentials, counts the tunnel by target host, and maps the target through the
//! emulator's `connect_to` entries (as a real proxy would resolve it with DNS). A request
//! that is not CONNECT is counted as `plain` and refused.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use kvbroker_tests::{Agent, EmulatorProc, canary, kvb, run};

struct TinyProxy {
    port: u16,
    counts: Arc<Mutex<HashMap<String, u32>>>,
}

impl TinyProxy {
    /// `auth`: the `Proxy-Authorization` value required, if any.
    fn start(emu: &EmulatorProc, auth: Option<String>) -> TinyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let counts = Arc::new(Mutex::new(HashMap::new()));
        // HOST:PORT → 127.0.0.1:PORT, from the emulator's connect_to entries.
        let map: HashMap<String, String> = emu
            .info
            .connect_to
            .iter()
            .map(|e| {
                let parts: Vec<&str> = e.splitn(3, ':').collect();
                (format!("{}:{}", parts[0], parts[1]), parts[2].to_owned())
            })
            .collect();
        let c = Arc::clone(&counts);
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (c, map, auth) = (Arc::clone(&c), map.clone(), auth.clone());
                std::thread::spawn(move || tunnel(conn, &c, &map, auth.as_deref()));
            }
        });
        TinyProxy { port, counts }
    }

    fn count(&self, what: &str) -> u32 {
        self.counts.lock().unwrap().get(what).copied().unwrap_or(0)
    }

    fn total(&self) -> u32 {
        self.counts.lock().unwrap().values().sum()
    }
}

fn tunnel(
    client: TcpStream,
    counts: &Mutex<HashMap<String, u32>>,
    map: &HashMap<String, String>,
    auth: Option<&str>,
) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        if line == "\r\n" {
            break;
        }
        head.push(line.trim_end().to_owned());
    }
    let mut client = client;
    let first: Vec<&str> = head.first().map(|l| l.split(' ').collect()).unwrap_or_default();
    if first.first() != Some(&"CONNECT") {
        *counts.lock().unwrap().entry("plain".into()).or_default() += 1;
        let _ = client.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
        return;
    }
    let target = first.get(1).copied().unwrap_or("").to_ascii_lowercase();
    let given = head.iter().find_map(|l| {
        l.split_once(':')
            .filter(|(k, _)| k.eq_ignore_ascii_case("proxy-authorization"))
            .map(|(_, v)| v.trim().to_owned())
    });
    if let Some(want) = auth
        && given.as_deref() != Some(want)
    {
        *counts.lock().unwrap().entry("refused_auth".into()).or_default() += 1;
        let _ = client.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n");
        return;
    }
    let host = target.split(':').next().unwrap_or("").to_owned();
    *counts.lock().unwrap().entry(host).or_default() += 1;
    let Some(addr) = map.get(&target) else {
        let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n");
        return;
    };
    let Ok(upstream) = TcpStream::connect(addr) else { return };
    client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").unwrap();
    // Anything the reader buffered past the head belongs to the tunnel (none: the client
    // waits for our answer before TLS starts).
    let (mut c2, mut u2) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let mut up = upstream;
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut u2, &mut c2);
        let _ = c2.shutdown(std::net::Shutdown::Both);
    });
    let _ = std::io::copy(&mut reader, &mut up);
    let _ = up.shutdown(std::net::Shutdown::Both);
}

fn basic(user: &str, pass: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!("{user}:{pass}").into_bytes();
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(A[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    format!("Basic {out}")
}

#[test]
fn the_test_proxy_checks_basic_auth_like_a_real_one() {
    assert_eq!(basic("Aladdin", "open sesame"), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
    assert_eq!(basic("a", "b"), "Basic YTpi");
}

/// HTTPS_PROXY with credentials: Key Vault goes through the tunnel, the Azure ML identity
/// endpoint does not, and the proxy password appears in no log, audit record or error.
#[test]
fn key_vault_goes_through_https_proxy_and_the_identity_endpoint_does_not() {
    let value = canary("proxy");
    let password = canary("proxypw");
    let emu = EmulatorProc::start(&[("s", &value)]);
    let proxy = TinyProxy::start(&emu, Some(basic("alice", &password)));
    let agent = Agent::builder("proxy")
        .keyvault(&emu, "azure-ml")
        .env("HTTPS_PROXY", &format!("http://alice:{password}@127.0.0.1:{}", proxy.port))
        .env("RUST_LOG", "debug")
        .allow_uid(0)
        .start();
    let (code, out, err) = run(kvb(&agent.socket, None).args(["get", "s"]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, value.as_str(), ""), "{}", agent.output());
    assert!(proxy.count("kvbroker-emu.vault.azure.net") >= 1, "the vault went through the proxy");
    assert_eq!(proxy.count("plain"), 0, "no plain HTTP (identity endpoint) through the proxy");
    assert_eq!(proxy.count("refused_auth"), 0);
    assert_eq!(proxy.total(), proxy.count("kvbroker-emu.vault.azure.net"));
    assert_eq!(emu.tokens()[0]["source"], "azure_ml");
    let log = agent.output();
    assert!(log.contains(&format!("proxy=http://127.0.0.1:{}", proxy.port)), "the proxy is named in the log");
    agent.assert_no_canary(&[&value, &password], &[&err]);
}

/// Entra ID (workload identity's token exchange) goes through the proxy too; NO_PROXY
/// sends the vault direct.
#[test]
fn entra_goes_through_the_proxy_and_no_proxy_goes_direct() {
    let emu = EmulatorProc::start(&[("s", "v")]);
    let proxy = TinyProxy::start(&emu, None);
    let agent = Agent::builder("proxy-wi")
        .keyvault(&emu, "workload-identity")
        .env("HTTPS_PROXY", &format!("127.0.0.1:{}", proxy.port))
        .env("NO_PROXY", ".vault.azure.net")
        .allow_uid(0)
        .start();
    let (code, out, _) = run(kvb(&agent.socket, None).args(["get", "s"]));
    assert_eq!((code, out.as_str()), (0, "v"), "{}", agent.output());
    assert_eq!(proxy.count("login.microsoftonline.com"), 1, "Entra through the proxy");
    assert_eq!(proxy.count("kvbroker-emu.vault.azure.net"), 0, "the vault is in NO_PROXY");
}

/// `[network] proxy` in the config works without any environment (and IMDS goes direct),
/// and a proxy that refuses the credentials is named in the error (without them).
#[test]
fn network_proxy_key_is_honoured_and_a_407_is_explained() {
    let password = canary("pw407");
    let emu = EmulatorProc::start(&[("s", "v")]);
    let proxy = TinyProxy::start(&emu, Some(basic("bob", &password)));
    let with_proxy = |tag: &str, pass: &str| {
        let b = Agent::builder(tag).keyvault(&emu, "imds").allow_uid(0).vault_extra("deadline = \"2s\"");
        let cfg = b.write();
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        text.push_str(&format!("\n[network]\nproxy = \"http://bob:{pass}@127.0.0.1:{}\"\n", proxy.port));
        std::fs::write(&cfg, text).unwrap();
        b.start_written()
    };
    let agent = with_proxy("proxy-cfg", &password);
    let (code, out, err) = run(kvb(&agent.socket, None).args(["get", "s"]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, "v", ""), "{}", agent.output());
    assert!(proxy.count("kvbroker-emu.vault.azure.net") >= 1);
    assert_eq!(proxy.count("plain"), 0, "IMDS never goes through the proxy");
    assert_eq!(emu.tokens()[0]["source"], "imds");
    agent.assert_no_canary(&[&password], &[]);

    let wrong = with_proxy("proxy-407", "wrong");
    let (code, _, err) = run(kvb(&wrong.socket, None).args(["get", "s"]));
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!(
            "proxy http://127.0.0.1:{} wants authentication for CONNECT kvbroker-emu.vault.azure.net",
            proxy.port
        )) && err.contains("the ones given were refused"),
        "{err}"
    );
    assert!(proxy.count("refused_auth") >= 1);
    wrong.assert_no_canary(&[&password], &[&err]);
}
