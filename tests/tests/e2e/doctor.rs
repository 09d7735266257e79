//! `kvbroker doctor`: passes on a healthy node (the emulator), and on each injected fault
//! fails the right check with the right advice and exit 1. Never prints a value or token.

use std::process::Command;

use kvbroker_tests::{Agent, EmulatorProc, Fault, TempDir, bin, canary, run};
use serde_json::{Value, json};

/// A config for the emulator whose policy names `default/db-password` exactly.
fn setup(emu: &EmulatorProc, tag: &str, source: &str) -> (TempDir, std::path::PathBuf) {
    let b = Agent::builder(tag)
        .keyvault(emu, source)
        .rule("name = \"train\"\nuids = [0]\nsecrets = [\"default/db-password\", \"default/storage-*\"]");
    let cfg = b.write();
    (b.into_dir(), cfg)
}

fn doctor(emu: &EmulatorProc, source: &str, cfg: &std::path::Path, extra: &[&str]) -> (i32, String, String) {
    let mut cmd = Command::new(bin("kvbroker"));
    cmd.arg("doctor").arg("--config").arg(cfg).args(extra).env_remove("RUST_LOG");
    if let Some(id) = emu.info.identity.get(source) {
        for (k, v) in &id.env {
            cmd.env(k, v);
        }
    }
    run(&mut cmd)
}

fn lines(out: &str) -> Vec<Value> {
    out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
}

#[test]
fn doctor_passes_on_a_healthy_node_and_prints_no_token_or_value() {
    let value = canary("doctor");
    let emu = EmulatorProc::start(&[("db-password", &value)]);
    let (_dir, cfg) = setup(&emu, "doctor-ok", "azure-ml");
    let (code, out, err) = doctor(&emu, "azure-ml", &cfg, &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    for want in [
        "ok    config",
        "ok    policy",
        "ok    identity source         azure-ml (configured; identity variables set: MSI_ENDPOINT, MSI_SECRET, DEFAULT_IDENTITY_CLIENT_ID)",
        "ok    token                   azure-ml managed identity (client id",
        "resolved, connected (direct), TLS verified, bearer challenge received",
        "ok    secret default/db-password  exists (version",
        "ok    socket directory",
        "ok    audit directory",
        "all checks passed",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    assert!(!out.contains("emu-token-") && !err.contains("emu-token-"), "no token printed");
    assert!(!out.contains(&value) && !err.contains(&value), "no value printed");
    assert_eq!(emu.count("get:db-password"), 1);

    let (code, out, _) = doctor(&emu, "azure-ml", &cfg, &["--json"]);
    assert_eq!(code, 0);
    let checks = lines(&out);
    assert!(checks.iter().all(|c| c["ok"] == json!(true)), "{checks:?}");
    assert!(checks.iter().any(|c| c["check"] == "token"));
}

#[test]
fn doctor_fails_a_firewall_refusal_with_network_advice() {
    let emu = EmulatorProc::start(&[("db-password", "v")]);
    let (_dir, cfg) = setup(&emu, "doctor-fw", "azure-ml");
    emu.fault(&Fault { kind: Some("firewall".into()), ..Fault::default() });
    let (code, out, _) = doctor(&emu, "azure-ml", &cfg, &["--json"]);
    assert_eq!(code, 1, "{out}");
    let checks = lines(&out);
    let failed: Vec<&Value> = checks.iter().filter(|c| c["ok"] == json!(false)).collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["check"], "secret default/db-password");
    let detail = failed[0]["detail"].as_str().unwrap();
    assert!(
        detail.contains("ForbiddenByFirewall") && detail.contains("firewall or private endpoint"),
        "{detail}"
    );
}

#[test]
fn doctor_fails_an_unassigned_identity_at_the_token_check() {
    let emu = EmulatorProc::start(&[("db-password", "v")]);
    let (_dir, cfg) = setup(&emu, "doctor-imds", "imds");
    emu.fault(&Fault { identity: Some("imds".into()), kind: Some("unassigned".into()), ..Fault::default() });
    let (code, out, _) = doctor(&emu, "imds", &cfg, &[]);
    assert_eq!(code, 1, "{out}");
    let token = out.lines().find(|l| l.starts_with("FAIL  token")).unwrap_or_else(|| panic!("{out}"));
    assert!(token.contains("answered HTTP 400: invalid_request: Identity not found"), "{token}");
    assert!(token.contains("no managed identity with that client id is assigned"), "{token}");
    assert!(out.contains("fix: see docs/troubleshooting.md#identity"), "{out}");
}

#[test]
fn doctor_fails_missing_and_soon_expiring_secrets() {
    let emu = EmulatorProc::start(&[("db-password", "v")]);
    let (_dir, cfg) = setup(&emu, "doctor-exp", "azure-ml");
    // Expires in an hour: fine for --min-validity 10m, not for the default 1d.
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    emu.update_secret("db-password", json!({"exp": exp}));
    let (code, out, _) = doctor(&emu, "azure-ml", &cfg, &[]);
    assert_eq!(code, 1, "{out}");
    let line = out
        .lines()
        .find(|l| l.starts_with("FAIL  secret default/db-password"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("is expired (exp") && line.contains("within 1day"), "{line}");
    assert_eq!(doctor(&emu, "azure-ml", &cfg, &["--min-validity", "10m"]).0, 0);

    // A secret the policy names that the vault lacks.
    let policy = cfg.with_file_name("policy.toml");
    let p = std::fs::read_to_string(&policy).unwrap().replace("default/db-password", "default/db-pasword");
    std::fs::write(&policy, p).unwrap();
    let (code, out, _) = doctor(&emu, "azure-ml", &cfg, &["--min-validity", "10m"]);
    assert_eq!(code, 1);
    assert!(
        out.contains(
            "FAIL  secret default/db-pasword  rule train names it, but the vault has no such secret"
        ),
        "{out}"
    );
}

/// A proxy that cannot be reached fails the vault check with proxy advice; the identity
/// endpoint (plain http on the node) never goes through it, so the token check passes.
#[test]
fn doctor_fails_an_unreachable_proxy_at_the_vault_check() {
    let emu = EmulatorProc::start(&[("db-password", "v")]);
    let (_dir, cfg) = setup(&emu, "doctor-proxy", "azure-ml");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cmd = Command::new(bin("kvbroker"));
    cmd.arg("doctor").arg("--config").arg(&cfg).arg("--json").env_remove("RUST_LOG");
    cmd.envs(&emu.info.identity["azure-ml"].env);
    cmd.env("HTTPS_PROXY", format!("http://u:pw-not-shown@127.0.0.1:{port}"));
    let (code, out, err) = run(&mut cmd);
    assert_eq!(code, 1, "{out}");
    let checks = lines(&out);
    let by =
        |name: &str| checks.iter().find(|c| c["check"] == name).unwrap_or_else(|| panic!("{name}: {out}"));
    assert_eq!(by("token")["ok"], json!(true), "the identity endpoint is not proxied");
    let vault = by("vault default");
    assert_eq!(vault["ok"], json!(false));
    let detail = vault["detail"].as_str().unwrap();
    assert!(detail.contains(&format!("through proxy http://127.0.0.1:{port}")), "{detail}");
    assert!(vault["fix"].as_str().unwrap().contains("check the proxy URL"), "{vault}");
    assert!(!out.contains("pw-not-shown") && !err.contains("pw-not-shown"), "proxy password never shown");
}
