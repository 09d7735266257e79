//! Issue 15: what a real Azure deployment meets that the happy path does not — Key Vault's
//! own refusals (firewall, RBAC, access policy, wrong tenant), permanent and transient
//! identity endpoint failures, throttling in every form, and `[identity] source` being
//! authoritative.

use std::process::Command;
use std::time::{Duration, Instant};

use kvbroker_tests::{Agent, EmulatorProc, Fault, bin, canary, kvb, raw_get, run};
use serde_json::Value;

fn read(agent: &Agent, name: &str) -> (u16, String) {
    let (s, body) = raw_get(&agent.socket, &format!("/v1/secrets/{name}"), &[]).unwrap();
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    (s, v["error"]["message"].as_str().unwrap_or("").to_owned())
}

fn kind(k: &str) -> Fault {
    Fault { kind: Some(k.into()), count: Some(1), ..Fault::default() }
}

/// Issue 15: a firewall refusal (`ForbiddenByFirewall`) was reported as a missing role.
/// Key Vault's status, codes and message now reach `kvb`, the agent log and the audit
/// record, with advice about the network rules, not the role.
#[test]
fn firewall_403_message_reaches_kvb_log_and_audit() {
    let value = canary("fw");
    let emu = EmulatorProc::start(&[("s", &value)]);
    let agent = Agent::builder("fw").keyvault(&emu, "azure-ml").allow_uid(0).start();
    emu.fault(&kind("firewall"));
    let (code, out, err) = run(kvb(&agent.socket, None).args(["get", "s"]));
    assert_eq!((code, out.as_str()), (1, ""));
    for want in [
        "HTTP 403 Forbidden/ForbiddenByFirewall",
        "Client address is not authorized and caller is not a trusted service. Client address: 127.0.0.1",
        "firewall or private endpoint",
    ] {
        assert!(err.contains(want), "kvb stderr lacks {want:?}: {err}");
    }
    assert!(!err.contains("Secrets User"), "no role advice for a firewall refusal: {err}");
    let rec = agent.audit_records().into_iter().rfind(|r| r["event"] == "secret.read").unwrap();
    let reason = rec["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("ForbiddenByFirewall") && reason.contains("Client address is not authorized"),
        "{rec}"
    );
    assert_eq!(
        rec["upstream"],
        serde_json::json!({"service": "key_vault", "status": 403, "code": "Forbidden", "inner_code": "ForbiddenByFirewall"}),
        "status and codes as fields of their own: {rec}"
    );
    let log = agent.output();
    assert!(log.contains("ForbiddenByFirewall"), "agent log names the inner code");
    assert!(log.contains("upstream_status=403"), "agent log has the status as a field: {log}");
    agent.assert_no_canary(&[&value], &[&err]);
}

/// Each refusal gets the advice that fits it.
#[test]
fn rbac_access_policy_and_wrong_tenant_get_their_own_advice() {
    let emu = EmulatorProc::start(&[("s", "v")]);
    let agent = Agent::builder("advice").keyvault(&emu, "azure-ml").allow_uid(0).start();
    let cases = [
        ("rbac", "HTTP 403 Forbidden/ForbiddenByRbac", "Key Vault Secrets User"),
        ("access_policy", "HTTP 403 Forbidden/AccessDenied", "access policy with secret Get"),
        ("wrong_tenant", "HTTP 401 Unauthorized: \"AKV10032: Invalid issuer.", "different Entra tenant"),
    ];
    for (k, summary, advice) in cases {
        emu.fault(&kind(k));
        let (s, m) = read(&agent, "s");
        assert_eq!(s, 502, "{k}: {m}");
        assert!(m.contains(summary) && m.contains(advice), "{k}: {m}");
    }
}

/// Issue 15: a 400 from the identity endpoint (no identity assigned) was retried for the
/// whole 15 s deadline on every cold read. It is permanent: 502 within a second, naming the
/// endpoint and its message, and the endpoint is asked once.
#[test]
fn permanent_imds_400_answers_502_within_a_second() {
    let emu = EmulatorProc::start(&[("s", "v")]);
    let agent = Agent::builder("imds400").keyvault(&emu, "imds").allow_uid(0).start();
    emu.fault(&Fault { identity: Some("imds".into()), kind: Some("unassigned".into()), ..Fault::default() });
    let t = Instant::now();
    let (s, m) = read(&agent, "s");
    let took = t.elapsed();
    assert_eq!(s, 502, "{m}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(
        m.contains(
            "the IMDS identity endpoint http://169.254.169.254/metadata/identity/oauth2/token answered HTTP 400: \
             invalid_request: Identity not found"
        ),
        "{m}"
    );
    assert!(!m.contains("cannot reach Key Vault"), "{m}");
    assert_eq!(emu.count("identity_fault_400"), 1, "not retried");
    assert_eq!(emu.count("get"), 0);
    let rec = agent.audit_records().into_iter().rfind(|r| r["event"] == "secret.read").unwrap();
    assert_eq!(
        rec["upstream"],
        serde_json::json!({"service": "imds", "status": 400, "code": "invalid_request"}),
        "{rec}"
    );
    // More cold reads right after are answered from the remembered refusal: the endpoint
    // is not hammered (IMDS allows 20 requests per second per VM).
    for _ in 0..3 {
        assert_eq!(read(&agent, "s").0, 502);
    }
    assert_eq!(emu.count("identity_fault_400"), 1, "refusal remembered");
}

/// IMDS answers 410 while it updates and 404/429 when busy: those are retried (Microsoft's
/// guidance), and the read succeeds.
#[test]
fn imds_410_404_and_429_are_retried() {
    let emu = EmulatorProc::start(&[("a", "v"), ("b", "v"), ("c", "v")]);
    let agent = Agent::builder("imds410").keyvault(&emu, "imds").allow_uid(0).start();
    emu.fault(&Fault {
        identity: Some("imds".into()),
        status: Some(410),
        count: Some(2),
        ..Fault::default()
    });
    let (s, m) = read(&agent, "a");
    assert_eq!(s, 200, "410: {m}");
    assert_eq!(emu.count("identity_fault_410"), 2);
    // The token is cached now; a new agent asks again.
    for (status, name) in [(404, "b"), (429, "c")] {
        let agent2 = Agent::builder(&format!("imds{status}")).keyvault(&emu, "imds").allow_uid(0).start();
        emu.fault(&Fault {
            identity: Some("imds".into()),
            status: Some(status),
            count: Some(1),
            ..Fault::default()
        });
        let (s, m) = read(&agent2, name);
        assert_eq!(s, 200, "{status}: {m}");
        assert_eq!(emu.count(&format!("identity_fault_{status}")), 1);
    }
    drop(agent);
}

/// Issue 15: an identity endpoint's 429 `Retry-After` was not read: the token request was
/// asked again after 1 s whatever the endpoint said.
#[test]
fn identity_endpoint_retry_after_is_honoured() {
    let emu = EmulatorProc::start(&[("a", "v")]);
    let agent = Agent::builder("imds429ra").keyvault(&emu, "imds").allow_uid(0).start();
    emu.fault(&Fault {
        identity: Some("imds".into()),
        status: Some(429),
        retry_after: Some(3),
        count: Some(1),
        ..Fault::default()
    });
    let asked = Instant::now();
    let (s, m) = read(&agent, "a");
    let took = asked.elapsed();
    assert_eq!(s, 200, "{m}");
    assert_eq!(emu.count("identity_fault_429"), 1);
    assert!(took >= Duration::from_millis(2900), "asked again after {took:?}, before Retry-After: 3");
}

/// Issue 15: a refused connection to the identity endpoint was reported as "cannot reach
/// Key Vault".
#[test]
fn identity_endpoint_network_failure_names_the_identity_endpoint() {
    let emu = EmulatorProc::start(&[("s", "v")]);
    // A loopback port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let agent = Agent::builder("idnet")
        .keyvault(&emu, "azure-ml")
        .env("MSI_ENDPOINT", &format!("http://127.0.0.1:{port}/token"))
        .vault_extra("deadline = \"2s\"")
        .allow_uid(0)
        .start();
    let (s, m) = read(&agent, "s");
    assert_eq!(s, 502);
    assert!(
        m.contains(&format!("cannot reach the Azure ML identity endpoint http://127.0.0.1:{port}/token")),
        "{m}"
    );
    assert!(!m.contains("cannot reach Key Vault"), "{m}");
}

/// A 429 without Retry-After pauses the whole vault (1 s first), not just the one request:
/// a read of another secret during the pause waits too.
#[test]
fn throttling_without_retry_after_pauses_the_whole_vault() {
    let emu = EmulatorProc::start(&[("a", "v"), ("b", "v")]);
    let agent = Agent::builder("throttle").keyvault(&emu, "azure-ml").allow_uid(0).start();
    // Warm the token so the timings below are Key Vault's alone.
    emu.fault(&Fault { secret: Some("warm".into()), status: Some(404), ..Fault::default() });
    let _ = read(&agent, "warm");
    emu.fault(&Fault { secret: Some("a".into()), status: Some(429), count: Some(1), ..Fault::default() });
    let socket = agent.socket.clone();
    let t = Instant::now();
    let first = std::thread::spawn(move || raw_get(&socket, "/v1/secrets/a", &[]).unwrap().0);
    std::thread::sleep(Duration::from_millis(200));
    let (s, m) = read(&agent, "b");
    let b_took = t.elapsed();
    assert_eq!(s, 200, "{m}");
    assert_eq!(first.join().unwrap(), 200);
    let a_took = t.elapsed();
    assert!(b_took >= Duration::from_millis(900), "b waited for the vault's pause: {b_took:?}");
    assert!(a_took < Duration::from_secs(3), "{a_took:?}");
    assert_eq!(emu.count("fault_429"), 1);
}

/// Retry-After comes as seconds, an HTTP-date, `retry-after-ms` or `x-ms-retry-after-ms`:
/// each is honoured.
#[test]
fn every_retry_after_form_is_honoured() {
    let emu = EmulatorProc::start(&[("a", "v"), ("b", "v"), ("c", "v")]);
    let agent = Agent::builder("ra").keyvault(&emu, "azure-ml").allow_uid(0).start();
    let forms = [
        ("a", Fault { retry_after_ms: Some(1500), ..Fault::default() }, 1400),
        ("b", Fault { x_ms_retry_after_ms: Some(1200), ..Fault::default() }, 1100),
        // An HTTP-date has whole seconds: 3 s ahead is at least 2 s away.
        ("c", Fault { retry_after_date_in: Some(3), ..Fault::default() }, 1900),
    ];
    for (name, f, at_least_ms) in forms {
        emu.fault(&Fault { secret: Some(name.into()), status: Some(429), count: Some(1), ..f });
        let t = Instant::now();
        let (s, m) = read(&agent, name);
        assert_eq!(s, 200, "{name}: {m}");
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(at_least_ms), "{name}: {took:?}");
        assert!(took < Duration::from_millis(at_least_ms + 2500), "{name}: {took:?}");
    }
}

/// Issue 15: `source = "imds"` went through the SDK's ManagedIdentityCredential, which saw
/// Azure ML's MSI_ENDPOINT and refused. A named source is the one used.
#[test]
fn named_imds_source_uses_imds_even_with_msi_endpoint_set() {
    let value = canary("imdsnamed");
    let emu = EmulatorProc::start(&[("s", &value)]);
    let aml = emu.info.identity["azure-ml"].env.clone();
    let mut b = Agent::builder("imdsnamed").keyvault(&emu, "imds").allow_uid(0);
    for (k, v) in &aml {
        b = b.env(k, v);
    }
    let agent = b.start();
    let (code, out, err) = run(kvb(&agent.socket, None).args(["get", "s"]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, value.as_str(), ""));
    let tokens = emu.tokens();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert_eq!(tokens[0]["source"], "imds");
    let log = agent.output();
    assert!(log.contains("identity source imds is configured: using IMDS"), "{log}");
    assert!(log.contains("MSI_ENDPOINT"), "{log}");
    agent.assert_no_canary(&[&value], &[]);
}

/// `auto` says which source it chose and why.
#[test]
fn auto_logs_its_choice_and_the_variables_behind_it() {
    let emu = EmulatorProc::start(&[("s", "v")]);
    let b = Agent::builder("autolog").keyvault(&emu, "azure-ml").allow_uid(0);
    let cfg = b.write();
    let text = std::fs::read_to_string(&cfg).unwrap().replace("source = \"azure-ml\"", "source = \"auto\"");
    std::fs::write(&cfg, text).unwrap();
    let agent = b.start_written();
    let log = agent.output();
    assert!(
        log.contains("identity source auto chose azure-ml: MSI_ENDPOINT and MSI_SECRET are set"),
        "{log}"
    );
}

/// Azure ML with no identity assigned sets DEFAULT_IDENTITY_CLIENT_ID=clientid and then
/// hands out a user token: the agent refuses to start and says why.
#[test]
fn azure_ml_clientid_literal_is_refused_at_start() {
    let emu = EmulatorProc::start(&[("s", "v")]);
    let b = Agent::builder("clientid").keyvault(&emu, "azure-ml").allow_uid(0);
    let cfg = b.write();
    let mut cmd = Command::new(bin("kvbroker"));
    cmd.args(["run", "--config"]).arg(&cfg);
    for (k, v) in &emu.info.identity["azure-ml"].env {
        cmd.env(k, v);
    }
    cmd.env("DEFAULT_IDENTITY_CLIENT_ID", "clientid");
    let (code, _, err) = run(&mut cmd);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "identity source azure-ml: DEFAULT_IDENTITY_CLIENT_ID is \"clientid\", not a client id (a GUID): \
             Azure ML sets it to the literal \"clientid\" when no managed identity is assigned to the compute"
        ),
        "{err}"
    );
    assert!(emu.tokens().is_empty());
}

/// Entra's refusal of workload identity's exchange (AADSTS…) is permanent: answered at once
/// with Entra's message, not retried for the whole deadline.
#[test]
fn entra_refusal_is_not_retried_and_keeps_its_message() {
    let emu = EmulatorProc::start(&[("s", "v")]);
    let agent = Agent::builder("aadsts")
        .keyvault(&emu, "workload-identity")
        .env("AZURE_CLIENT_ID", "00000000-0000-0000-0000-000000000000")
        .allow_uid(0)
        .start();
    let t = Instant::now();
    let (s, m) = read(&agent, "s");
    let took = t.elapsed();
    assert_eq!(s, 502, "{m}");
    assert!(m.contains("AADSTS700211"), "{m}");
    assert!(took < Duration::from_secs(2), "{took:?}: {m}");
}

/// The emulator checks api-version strictly, as Key Vault does: an unknown one is a 400
/// with Key Vault's message; the SDK's own version is accepted (every read above).
#[test]
fn the_emulator_refuses_an_unknown_api_version_like_key_vault() {
    let emu = EmulatorProc::start(&[("s", "v")]);
    let base = emu.info.control_url.trim_end_matches("/control");
    let tok = Command::new("curl")
        .args(["-s", "-H", "Metadata: true"])
        .arg(format!(
            "{base}/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://vault.azure.net"
        ))
        .output()
        .unwrap();
    let tok: Value = serde_json::from_slice(&tok.stdout).unwrap();
    let auth = format!("Authorization: Bearer {}", tok["access_token"].as_str().unwrap());
    let get = |version: &str| {
        let out = Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", "-H", &auth, "--cacert"])
            .arg(&emu.info.ca_file)
            .args(["--connect-to", &emu.info.connect_to[0]])
            .arg(format!("{}/secrets/s?api-version={version}", emu.info.vault_url))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.to_owned(), body.to_owned())
    };
    let (code, body) = get("7.9");
    assert_eq!(code, "400");
    assert!(body.contains("The specified version (7.9) is not recognized"), "{body}");
    assert_eq!(get("7.5").0, "200");
    assert_eq!(get("2025-07-01").0, "200");
}

/// Azure ML compute instances: a systemd agent does not see the job's MSI_ENDPOINT and
/// MSI_SECRET. `[identity] azure_ml_endpoint` + `azure_ml_secret_file` give them explicitly
/// (docs/deploy.md), and `auto` picks Azure ML from them. A secret file others can read is
/// refused at start.
#[test]
fn compute_instance_agent_takes_the_azure_ml_endpoint_from_config() {
    use std::os::unix::fs::PermissionsExt;
    let value = canary("ci");
    let emu = EmulatorProc::start(&[("s", &value)]);
    let aml = emu.info.identity["azure-ml"].env.clone();
    // No identity variables in the agent's environment at all.
    let b = Agent::builder("ci").keyvault(&emu, "imds").allow_uid(0);
    let cfg = b.write();
    let secret_file = cfg.with_file_name("msi-secret");
    std::fs::write(&secret_file, format!("{}\n", aml["MSI_SECRET"])).unwrap();
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        "[identity]\nsource = \"imds\"\n",
        &format!(
            "[identity]\nsource = \"auto\"\nazure_ml_endpoint = {:?}\nazure_ml_secret_file = {:?}\nclient_id = {:?}\n",
            aml["MSI_ENDPOINT"],
            secret_file.display().to_string(),
            aml["DEFAULT_IDENTITY_CLIENT_ID"]
        ),
    );
    std::fs::write(&cfg, text).unwrap();
    let agent = b.start_written();
    let (code, out, err) = run(kvb(&agent.socket, None).args(["get", "s"]));
    assert_eq!((code, out.as_str(), err.as_str()), (0, value.as_str(), ""), "{}", agent.output());
    assert_eq!(emu.tokens()[0]["source"], "azure_ml");
    assert!(
        agent.output().contains("identity source auto chose azure-ml: [identity] azure_ml_endpoint is set")
    );
    agent.assert_no_canary(&[&value, &aml["MSI_SECRET"]], &[]);

    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (code, _, err) = agent.run_again();
    assert_eq!(code, 1);
    assert!(err.contains("azure_ml_secret_file") && err.contains("lets others read it: chmod 0600"), "{err}");
}
