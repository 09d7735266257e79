//! The emulator on its own, driven with curl as a user would: TLS under the vault's name via
//! --connect-to, the bearer challenge, and each secrets operation.

use std::process::Command;

use kvbroker_tests::{Agent, EmulatorProc, kvb, raw_get, run};
use serde_json::Value;

struct Curl<'a> {
    emu: &'a EmulatorProc,
    token: String,
}

impl Curl<'_> {
    fn new(emu: &EmulatorProc) -> Curl<'_> {
        let base = emu.info.control_url.trim_end_matches("/control");
        let (code, out, _) = run(Command::new("curl").args([
            "-s",
            "-H",
            "Metadata: true",
            &format!("{base}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net"),
        ]));
        assert_eq!(code, 0);
        let v: Value = serde_json::from_str(&out).unwrap();
        Curl { emu, token: v["access_token"].as_str().unwrap().to_owned() }
    }

    /// (status, body) of a call to the vault.
    fn call(&self, method: &str, path: &str, body: Option<&str>, auth: bool) -> (u16, Value) {
        let url = format!(
            "{}{path}{}api-version=7.6",
            self.emu.info.vault_url,
            if path.contains('?') { "&" } else { "?" }
        );
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-w", "\n%{http_code}", "-X", method, "--cacert"]).arg(&self.emu.info.ca_file);
        for c in &self.emu.info.connect_to {
            cmd.args(["--connect-to", c]);
        }
        if auth {
            cmd.args(["-H", &format!("Authorization: Bearer {}", self.token)]);
        }
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "-d", b]);
        }
        cmd.arg(&url);
        let (code, out, err) = run(&mut cmd);
        assert_eq!(code, 0, "curl {url}: {err}");
        let (body, status) = out.rsplit_once('\n').unwrap();
        (status.parse().unwrap(), serde_json::from_str(body).unwrap_or(Value::Null))
    }
}

#[test]
fn emulator_speaks_the_secrets_api() {
    let emu = EmulatorProc::start(&[("Db-Password", "v1")]);
    let c = Curl::new(&emu);

    let (s, _) = c.call("GET", "/secrets/db-password", None, false);
    assert_eq!(s, 401, "no token: the challenge");

    let (s, v) = c.call("GET", "/secrets/db-password", None, true);
    assert_eq!(s, 200);
    assert_eq!(v["value"], "v1");
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with(&format!("{}/secrets/Db-Password/", emu.info.vault_url)), "{id}");
    let v1 = id.rsplit('/').next().unwrap().to_owned();

    for i in 2..=30 {
        let (s, v) = c.call("PUT", "/secrets/db-password", Some(&format!("{{\"value\":\"v{i}\"}}")), true);
        assert_eq!(s, 200);
        assert_eq!(v["value"], format!("v{i}"));
    }
    assert_eq!(c.call("GET", "/secrets/db-password", None, true).1["value"], "v30");
    assert_eq!(c.call("GET", &format!("/secrets/db-password/{v1}"), None, true).1["value"], "v1");

    // Paged listing: 30 versions, 25 then 5, following nextLink.
    let (s, page1) = c.call("GET", "/secrets/db-password/versions", None, true);
    assert_eq!(s, 200);
    assert_eq!(page1["value"].as_array().unwrap().len(), 25);
    assert!(page1["value"][0].get("value").is_none(), "listings carry no values");
    let next = page1["nextLink"].as_str().unwrap();
    let path = next.strip_prefix(&emu.info.vault_url).unwrap().replace("api-version=7.6&", "");
    let (_, page2) = c.call("GET", &path, None, true);
    assert_eq!(page2["value"].as_array().unwrap().len(), 5);
    assert!(page2["nextLink"].is_null());

    // Attributes: disable → 403 SecretDisabled.
    let (s, _) = c.call(
        "PATCH",
        &format!("/secrets/db-password/{v1}"),
        Some(r#"{"attributes":{"enabled":false}}"#),
        true,
    );
    assert_eq!(s, 200);
    let (s, v) = c.call("GET", &format!("/secrets/db-password/{v1}"), None, true);
    assert_eq!(s, 403);
    assert_eq!(v["error"]["innererror"]["code"], "SecretDisabled");

    let (s, v) = c.call("DELETE", "/secrets/db-password", None, true);
    assert_eq!(s, 200);
    assert!(v["recoveryId"].is_string());
    let (s, v) = c.call("GET", "/secrets/db-password", None, true);
    assert_eq!(s, 404);
    assert_eq!(v["error"]["code"], "SecretNotFound");
    assert_eq!(emu.count("set"), 29);
    assert_eq!(emu.count("list_versions"), 2);
}

/// A read pinned to a version goes to Key Vault as such and is served.
#[test]
fn agent_reads_a_pinned_version_from_key_vault() {
    let emu = EmulatorProc::start(&[("s", "first")]);
    let agent = Agent::builder("pinned")
        .keyvault(&emu, "azure-ml")
        .allow_uid(0)
        .cache("refresh_interval = \"1s\"")
        .start();
    let (_, body) = raw_get(&agent.socket, "/v1/secrets/s", &[]).unwrap();
    let first: Value = serde_json::from_str(&body).unwrap();
    let v1 = first["version"].as_str().unwrap().to_owned();
    emu.set_secret("s", "second", serde_json::json!({}));
    // Served from cache until the next refresh (1 s ± 10 %) finds the new version.
    let t = std::time::Instant::now();
    while run(kvb(&agent.socket, None).args(["get", "s"])).1 != "second" {
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "new version not picked up");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(run(kvb(&agent.socket, None).args(["get", "s", "--version", &v1])).1, "first");
    let missing = "0".repeat(32);
    let (code, _, err) = run(kvb(&agent.socket, None).args(["get", "s", "--version", &missing]));
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!("kvb: version {missing} of s not found in vault default (request ")),
        "{err}"
    );
}
