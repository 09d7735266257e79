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
