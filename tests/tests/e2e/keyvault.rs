//! Reading from Key Vault (the emulator) through each managed identity source, the
//! challenge flow, the loopback guard, and the error mapping.

use std::time::{Duration, Instant};

use kvbroker_tests::{Agent, EmulatorProc, Fault, canary, kvb, raw_get, run};
use serde_json::{Value, json};

fn read_json(agent: &Agent, path: &str) -> (u16, Value) {
    let (s, body) = raw_get(&agent.socket, path, &[]).unwrap();
    (s, serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}")))
}

/// One read through an identity source; returns what the emulator logged for the token.
fn read_through(source: &str, client_id: Option<&str>) -> Vec<Value> {
    let value = canary(source);
    let emu = EmulatorProc::start(&[("db-password", &value)]);
    let mut b = Agent::builder(source).keyvault(&emu, source).allow_uid(0).env("RUST_LOG", "trace");
    if let Some(c) = client_id {
        b = b.client_id(c);
    }
    let agent = b.start();
    let (code, out, err) = run(kvb(&agent.socket, None).args(["get", "db-password"]));
    assert_eq!((code, err.as_str()), (0, ""), "{}", agent.output());
    assert_eq!(out, value);
    assert_eq!(emu.count("get"), 1);
    assert!(emu.count("challenge") >= 1, "the 401 challenge flow ran");
    let rec = agent.audit_records().into_iter().find(|r| r["event"] == "secret.read").unwrap();
    assert_eq!(rec["outcome"], "allowed");
    let upstream = rec["upstream_request_id"].as_str().unwrap();
    assert_eq!(upstream.len(), 36, "x-ms-client-request-id kept for the audit record");
    agent.assert_no_canary(&[&value], &[&err]);
    emu.tokens()
}

#[test]
fn reads_through_azure_ml_identity() {
    let tokens = read_through("azure-ml", None);
    assert_eq!(tokens.len(), 1, "one token, cached: {tokens:?}");
    assert_eq!(tokens[0]["source"], "azure_ml");
}

#[test]
fn reads_through_azure_ml_user_assigned_identity() {
    let value = canary("aml-ua");
    let emu = EmulatorProc::start(&[("db-password", &value)]);
    let ua_id = emu.info.identity["azure-ml"].user_assigned_client_id.clone().unwrap();
    let agent = Agent::builder("aml-ua").keyvault(&emu, "azure-ml").client_id(&ua_id).allow_uid(0).start();
    let (code, out, err) = run(kvb(&agent.socket, None).args(["get", "db-password"]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, value.as_str(), ""));
    let tokens = emu.tokens();
    assert_eq!(tokens, vec![json!({"source": "azure_ml", "client_id": ua_id})]);
    agent.assert_no_canary(&[&value], &[]);
}

#[test]
fn reads_through_app_service_identity() {
    let tokens = read_through("app-service", None);
    assert_eq!(tokens[0]["source"], "app_service");
}

/// IMDS's address is fixed in the SDK: the transport's override table maps it to the
/// emulator, and the loopback guard would refuse it otherwise.
#[test]
fn reads_through_imds_via_the_override_table() {
    let tokens = read_through("imds", None);
    assert_eq!(tokens[0]["source"], "imds");
}

#[test]
fn reads_through_azure_arc_challenge_file() {
    let tokens = read_through("azure-arc", None);
    assert_eq!(tokens[0]["source"], "azure_arc");
}

/// The emulator stands in for Entra ID's client-assertion exchange (on the TLS side, as
/// login.microsoftonline.com through connect_to).
#[test]
fn reads_through_workload_identity() {
    let tokens = read_through("workload-identity", None);
    assert_eq!(tokens[0]["source"], "workload_identity");
}

/// `source = "auto"` picks Azure ML from MSI_ENDPOINT/MSI_SECRET, as the SDKs order it.
#[test]
fn auto_detects_azure_ml_from_the_environment() {
    let value = canary("auto");
    let emu = EmulatorProc::start(&[("s", &value)]);
    let agent = Agent::builder("auto").keyvault(&emu, "azure-ml").allow_uid(0);
    let cfg = agent.write();
    let text = std::fs::read_to_string(&cfg).unwrap().replace("source = \"azure-ml\"", "source = \"auto\"");
    std::fs::write(&cfg, text).unwrap();
    let agent = agent.start_written();
    assert_eq!(run(kvb(&agent.socket, None).args(["get", "s"])).1, value);
    assert_eq!(emu.tokens()[0]["source"], "azure_ml");
}

/// A vault whose CA is not trusted fails with a clear error (and no value).
#[test]
fn untrusted_vault_ca_fails_clearly() {
    let emu = EmulatorProc::start(&[("s", "v")]);
    let b =
        Agent::builder("untrusted").keyvault(&emu, "azure-ml").allow_uid(0).vault_extra("deadline = \"2s\"");
    let cfg = b.write();
    // Keep the identity's CA, drop the vault's: TLS to the vault must fail.
    let text = std::fs::read_to_string(&cfg).unwrap();
    let vault_at = text.find("[[vault]]").unwrap();
    let (head, tail) = text.split_at(vault_at);
    let tail: String = tail.lines().filter(|l| !l.starts_with("ca_file")).map(|l| format!("{l}\n")).collect();
    std::fs::write(&cfg, format!("{head}{tail}")).unwrap();
    let agent = b.start_written();
    let (s, v) = read_json(&agent, "/v1/secrets/s");
    assert_eq!(s, 502);
    assert_eq!(v["error"]["code"], "UpstreamUnavailable");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("TLS with kvbroker-emu.vault.azure.net failed") && msg.contains("ca_file"), "{msg}");
    assert_eq!(emu.count("get"), 0);
}

/// In loopback-only mode a vault URL that would leave loopback is refused before any
/// connection: the emulator sees nothing, the caller gets a clear 502.
#[test]
fn loopback_guard_refuses_a_real_vault_and_real_imds() {
    let emu = EmulatorProc::start(&[("s", "v")]);
    // The vault URL names a real Azure host with no connect_to entry.
    let b = Agent::builder("guard").keyvault(&emu, "imds").allow_uid(0).vault_extra("deadline = \"3s\"");
    let cfg = b.write();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replace(&emu.info.vault_url, "https://myvault.vault.azure.net");
    // And IMDS loses its mapping, so the identity endpoint would be 169.254.169.254.
    let text = text.replace(&format!("{:?}, ", emu.info.identity["imds"].connect_to[0]), "");
    std::fs::write(&cfg, &text).unwrap();
    assert!(!text.contains("169.254.169.254:80:"), "{text}");
    let agent = b.start_written();
    let (s, v) = read_json(&agent, "/v1/secrets/s");
    assert_eq!(s, 502);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("loopback-only mode refused myvault.vault.azure.net:443"), "{msg}");
    assert_eq!(emu.count("vault_requests"), 0);

    // With the vault reachable but IMDS unmapped, the token request is refused instead.
    let b = Agent::builder("guard2").keyvault(&emu, "imds").allow_uid(0).vault_extra("deadline = \"3s\"");
    let cfg = b.write();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replace(&format!("{:?}, ", emu.info.identity["imds"].connect_to[0]), "");
    std::fs::write(&cfg, &text).unwrap();
    let agent = b.start_written();
    let (s, v) = read_json(&agent, "/v1/secrets/s");
    assert_eq!(s, 502);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("could not get a token") && msg.contains("169.254.169.254"), "{msg}");
    assert_eq!(emu.count("token_imds"), 0);
}

/// Key Vault's answers map to the SPEC codes: 404 → SecretNotFound, disabled → 422,
/// 403 → 502 naming identity and vault, 5xx/429 → 502 after bounded retries.
#[test]
fn key_vault_errors_map_to_spec_codes() {
    let value = canary("map");
    let secrets: Vec<(String, String)> = ["ok1", "ok2", "ok3", "ok4", "ok5", "ok6", "off", "exp"]
        .iter()
        .map(|n| ((*n).to_owned(), value.clone()))
        .collect();
    let refs: Vec<(&str, &str)> = secrets.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let emu = EmulatorProc::start(&refs);
    emu.update_secret("off", json!({"enabled": false}));
    emu.update_secret("exp", json!({"exp": 1_000_000_000}));
    let agent = Agent::builder("map")
        .keyvault(&emu, "azure-ml")
        .allow_uid(0)
        .vault_extra("deadline = \"3s\"")
        .start();
    let code = |p: &str| {
        let (s, v) = read_json(&agent, p);
        (
            s,
            v["error"]["code"].as_str().unwrap_or("").to_owned(),
            v["error"]["message"].as_str().unwrap_or("").to_owned(),
        )
    };
    assert_eq!(code("/v1/secrets/missing").0, 404);
    assert_eq!(code("/v1/secrets/missing").1, "SecretNotFound");
    let (s, c, m) = code("/v1/secrets/off");
    assert_eq!((s, c.as_str()), (422, "SecretNotUsable"));
    assert!(m.ends_with("disabled"), "{m}");
    let (s, _, m) = code("/v1/secrets/exp");
    assert_eq!(s, 422);
    assert!(m.contains("expired (exp 2001-09-09T01:46:40Z)"), "{m}");

    emu.fault(&Fault { status: Some(403), count: Some(1), ..Fault::default() });
    let (s, c, m) = code("/v1/secrets/ok1");
    assert_eq!((s, c.as_str()), (502, "UpstreamUnavailable"));
    assert!(
        m.contains("refused azure-ml managed identity (client id") && m.contains(&emu.info.vault_url),
        "{m}"
    );

    // Two 500s then success: retried within the deadline.
    emu.reset_counts();
    emu.fault(&Fault { status: Some(500), count: Some(2), ..Fault::default() });
    let (s, v) = read_json(&agent, "/v1/secrets/ok2");
    assert_eq!(s, 200, "{v}");
    assert_eq!(emu.count("get"), 1);
    assert_eq!(emu.count("fault_500"), 2);

    // 500 forever: 502 within the deadline.
    emu.fault(&Fault { status: Some(500), ..Fault::default() });
    let t = Instant::now();
    let (s, c, _) = code("/v1/secrets/ok3");
    assert_eq!((s, c.as_str()), (502, "UpstreamUnavailable"));
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    emu.clear_faults();

    // A dropped connection is retried.
    emu.fault(&Fault { drop: true, count: Some(1), ..Fault::default() });
    assert_eq!(read_json(&agent, "/v1/secrets/ok5").0, 200);
    // 429 with Retry-After longer than the deadline: no waiting past it.
    emu.fault(&Fault { status: Some(429), retry_after: Some(30), count: Some(1), ..Fault::default() });
    let t = Instant::now();
    let (s, _, m) = code("/v1/secrets/ok4");
    assert_eq!(s, 502);
    assert!(m.contains("throttling") || m.contains("paused"), "{m}");
    assert!(t.elapsed() < Duration::from_secs(4));

    // Retry-After is honoured for every call to that vault: another secret is not fetched
    // either (the pause outlasts the 3 s deadline, so the answer comes at once).
    let t = Instant::now();
    let (s, _, m) = code("/v1/secrets/ok6");
    assert_eq!(s, 502);
    assert!(m.contains("paused"), "{m}");
    assert!(t.elapsed() < Duration::from_secs(1));
    let recs = agent.audit_records();
    assert!(recs.iter().filter(|r| r["cache"] == "miss").all(|r| r["upstream_request_id"].is_string()));
    agent.assert_no_canary(&[&value], &[]);
}

/// A hung Key Vault does not hold a caller past the vault's deadline.
#[test]
fn hung_vault_does_not_hold_callers_past_the_deadline() {
    let emu = EmulatorProc::start(&[("s", "v")]);
    let agent = Agent::builder("hung")
        .keyvault(&emu, "azure-ml")
        .allow_uid(0)
        .vault_extra("deadline = \"2s\"")
        .start();
    emu.fault(&Fault { latency_ms: Some(60_000), ..Fault::default() });
    let t = Instant::now();
    let (s, v) = read_json(&agent, "/v1/secrets/s");
    let took = t.elapsed();
    assert_eq!(s, 502, "{v}");
    assert!(took >= Duration::from_secs(2) && took < Duration::from_secs(4), "{took:?}");
    assert!(v["error"]["message"].as_str().unwrap().contains("did not answer within 2s"), "{v}");
}

/// With `RUST_LOG=trace`, the Azure SDK's own tracing reaches the agent's log, and still no
/// value or token appears in it.
#[test]
fn sdk_trace_output_is_captured_and_holds_no_value_or_token() {
    let value = canary("sdktrace");
    let emu = EmulatorProc::start(&[("s", &value)]);
    let agent = Agent::builder("sdktrace")
        .keyvault(&emu, "app-service")
        .allow_uid(0)
        .env("RUST_LOG", "trace")
        .start();
    assert_eq!(run(kvb(&agent.socket, None).args(["get", "s"])).1, value);
    let out = agent.output();
    assert!(out.contains("azure_core") || out.contains("typespec"), "SDK tracing is captured");
    assert!(!out.contains("emu-token-"), "no bearer token in the log");
    let header = &emu.info.identity["app-service"].env["IDENTITY_HEADER"];
    assert!(!out.contains(header.as_str()), "no identity header secret in the log");
    agent.assert_no_canary(&[&value], &[]);
}

/// `source = "azure-cli"` runs `az account get-access-token`; a stand-in `az` on PATH gets a
/// real token from the emulator (loopback) and prints it the way the CLI does.
#[test]
fn reads_through_azure_cli() {
    use std::os::unix::fs::PermissionsExt;
    let value = canary("azcli");
    let emu = EmulatorProc::start(&[("s", &value)]);
    let bin_dir = emu.dir.path().join("fake-bin");
    std::fs::create_dir(&bin_dir).unwrap();
    let marker = emu.dir.path().join("az-called");
    let base = emu.info.control_url.trim_end_matches("/control");
    let script = format!(
        "#!/bin/sh\n# Stand-in for the Azure CLI: a token from the emulator.\n\
         echo \"$@\" > {marker}\n\
         out=$(curl -s -H 'Metadata: true' '{base}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net')\n\
         python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(json.dumps({{\"accessToken\": d[\"access_token\"], \"expires_on\": int(d[\"expires_on\"]), \"tokenType\": \"Bearer\"}}))' \"$out\"\n",
        marker = marker.display()
    );
    let az = bin_dir.join("az");
    std::fs::write(&az, script).unwrap();
    std::fs::set_permissions(&az, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let agent = Agent::builder("azcli").keyvault(&emu, "azure-cli").env("PATH", &path).allow_uid(0).start();
    let (code, out, err) = run(kvb(&agent.socket, None).args(["get", "s"]));
    assert_eq!((code, err.as_str()), (0, ""), "{}", agent.output());
    assert_eq!(out, value);
    let args = std::fs::read_to_string(&marker).unwrap();
    assert!(
        args.starts_with("account get-access-token -o json --scope https://vault.azure.net/.default"),
        "{args}"
    );
    agent.assert_no_canary(&[&value], &[]);
}
