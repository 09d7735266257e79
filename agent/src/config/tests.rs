use super::*;

const GOOD: &str = r#"
[agent]
socket = "/run/kvbroker/agent.sock"
socket_mode = "0660"
socket_group = "mljobs"

[identity]
source = "azure-ml"

[[vault]]
alias = "default"
kind = "local"
file = "secrets.toml"

[cache]
refresh_interval = "5m"
max_stale = "1h"

[audit]
path = "/var/log/kvbroker/audit.jsonl"
durability = "fsync"

[policy]
file = "policy.toml"
"#;

fn load(text: &str) -> Result<Config, ConfigError> {
    Config::from_toml(Path::new("/etc/kvbroker/config.toml"), text)
}

#[test]
fn parses_a_full_config() {
    let c = load(GOOD).unwrap();
    assert_eq!(c.agent.socket_mode, 0o660);
    assert_eq!(c.identity.source, IdentitySource::AzureMl);
    assert_eq!(c.cache.refresh_interval, Duration::from_secs(300));
    assert_eq!(c.audit.durability, Durability::Fsync);
    assert_eq!(c.policy.file, Path::new("/etc/kvbroker/policy.toml"));
    match &c.vaults[0].backend {
        BackendConfig::Local { file, .. } => {
            assert_eq!(file, Path::new("/etc/kvbroker/secrets.toml"))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.default_vault().unwrap().as_str(), "default");
}

#[test]
fn unknown_key_names_file_line_and_key() {
    let text = GOOD.replace("refresh_interval", "refresh_intervl");
    let e = load(&text).unwrap_err().to_string();
    assert!(e.starts_with("/etc/kvbroker/config.toml:16: "), "{e}");
    assert!(e.contains("refresh_intervl"), "{e}");
    assert!(e.contains("refresh_interval"), "{e}");
}

#[test]
fn bad_duration_names_line_and_key() {
    let text = GOOD.replace("\"1h\"", "\"soon\"");
    let e = load(&text).unwrap_err().to_string();
    assert!(e.starts_with("/etc/kvbroker/config.toml:17: key `max_stale`: invalid duration"), "{e}");
}

#[test]
fn bad_mode_is_refused() {
    let e = load(&GOOD.replace("\"0660\"", "\"0999\"")).unwrap_err().to_string();
    assert!(e.contains(":4: key `socket_mode`: invalid mode"), "{e}");
}

/// Issue 13: a `refresh_interval` of centuries passed, and the first read panicked a worker
/// (an `Instant` overflow). Every duration past 10 years is refused with its line.
#[test]
fn duration_past_ten_years_is_refused_with_its_line() {
    let text = GOOD.replace("refresh_interval = \"5m\"", "refresh_interval = \"500years\"");
    assert_ne!(text, GOOD);
    let line = text.lines().position(|l| l.starts_with("refresh_interval")).unwrap() + 1;
    let e = load(&text).unwrap_err().to_string();
    assert!(
        e.ends_with(&format!(
            ":{line}: key `refresh_interval`: duration \"500years\" is longer than 10 years: write a shorter one"
        )),
        "{e}"
    );
    let ok = GOOD.replace("refresh_interval = \"5m\"", "refresh_interval = \"3650days\"");
    load(&ok).unwrap();
}

#[test]
fn bare_number_duration_is_refused() {
    assert!(parse_duration("300").is_err());
    assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
    assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
    assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
}

#[test]
fn vault_needs_exactly_one_source() {
    let text = GOOD.replace("kind = \"local\"\n", "");
    let e = load(&text).unwrap_err().to_string();
    assert!(e.contains("file is only for kind = \"local\""), "{e}");
    let text = GOOD.replace("file = \"secrets.toml\"", "url = \"https://x.vault.azure.net\"");
    let e = load(&text).unwrap_err().to_string();
    assert!(e.contains("cannot have a url"), "{e}");
}

#[test]
fn missing_sections_say_what_to_add() {
    let text = GOOD.replace("[policy]\nfile = \"policy.toml\"", "");
    let e = load(&text).unwrap_err().to_string();
    assert!(e.contains("missing [policy] section"), "{e}");
}

#[test]
fn unknown_identity_source_is_refused() {
    let e = load(&GOOD.replace("azure-ml", "azureml")).unwrap_err().to_string();
    assert!(e.contains(":8: key `source`"), "{e}");
    assert!(
        e.contains(
            "unknown identity source \"azureml\": use one of auto, imds, app-service, azure-ml, \
             workload-identity, azure-arc, azure-cli"
        ),
        "{e}"
    );
}

#[test]
fn identity_source_names_round_trip() {
    for s in IdentitySource::ALL {
        assert_eq!(s.as_str().parse::<IdentitySource>(), Ok(s));
        let c = load(&GOOD.replace("azure-ml", s.as_str())).unwrap();
        assert_eq!(c.identity.source, s);
    }
    assert!("Azure-ML".parse::<IdentitySource>().is_err(), "names are exact");
    assert!("".parse::<IdentitySource>().is_err());
}

/// Drift test: the shipped example parses, and its values are the documented defaults.
#[test]
fn example_config_parses_with_defaults() {
    let text = include_str!("../../../deploy/config.example.toml");
    let c = load(text).unwrap();
    let bare = load(
        "[[vault]]\nalias = \"default\"\nurl = \"https://myvault.vault.azure.net\"\n\
         [audit]\npath = \"/var/log/kvbroker/audit.jsonl\"\n[policy]\nfile = \"/etc/kvbroker/policy.toml\"\n",
    )
    .unwrap();
    assert_eq!(c.agent.socket, bare.agent.socket);
    assert_eq!(c.agent.socket_mode, bare.agent.socket_mode);
    assert_eq!(c.agent.admin_socket, bare.agent.admin_socket);
    assert_eq!(c.agent.shutdown_grace, bare.agent.shutdown_grace);
    assert_eq!(c.identity.source, bare.identity.source);
    assert_eq!(c.cache.refresh_interval, bare.cache.refresh_interval);
    assert_eq!(c.cache.max_stale, bare.cache.max_stale);
    assert_eq!(c.audit.durability, bare.audit.durability);
    assert_eq!(c.audit.rotate_bytes, bare.audit.rotate_bytes);
    assert_eq!(c.agent.loopback_only, bare.agent.loopback_only);
    assert_eq!(
        (c.cache.evict_idle, c.cache.version_grace),
        (bare.cache.evict_idle, bare.cache.version_grace)
    );
    assert_eq!(
        (c.audit.rotate_keep, c.audit.write_timeout, c.audit.checkpoint_interval),
        (bare.audit.rotate_keep, bare.audit.write_timeout, bare.audit.checkpoint_interval)
    );
    assert_eq!(
        (c.limits.rate_per_second, c.limits.burst, c.limits.rate_key, c.limits.connections_per_uid),
        (
            bare.limits.rate_per_second,
            bare.limits.burst,
            bare.limits.rate_key,
            bare.limits.connections_per_uid
        )
    );
    match (&c.vaults[0].backend, &bare.vaults[0].backend) {
        (
            BackendConfig::KeyVault {
                connect_timeout: a1,
                request_timeout: b1,
                deadline: d1,
                max_calls_per_second: m1,
                ..
            },
            BackendConfig::KeyVault {
                connect_timeout: a2,
                request_timeout: b2,
                deadline: d2,
                max_calls_per_second: m2,
                ..
            },
        ) => assert_eq!((a1, b1, d1, m1), (a2, b2, d2, m2)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn key_vault_keys_parse_and_are_checked() {
    let text = GOOD.replace(
        "kind = \"local\"\nfile = \"secrets.toml\"",
        "url = \"https://x.vault.azure.net\"\nconnect_to = [\"x.vault.azure.net:443:127.0.0.1:8443\"]\ndeadline = \"2s\"",
    );
    let c = load(&text).unwrap();
    match &c.vaults[0].backend {
        BackendConfig::KeyVault { connect_to, deadline, .. } => {
            assert_eq!(connect_to[0].addr, "127.0.0.1:8443".parse().unwrap());
            assert_eq!(*deadline, Duration::from_secs(2));
        }
        other => panic!("{other:?}"),
    }
    let bad = text.replace("x.vault.azure.net:443:127.0.0.1:8443", "nonsense");
    let e = load(&bad).unwrap_err().to_string();
    assert!(e.contains(":13: key `connect_to`: invalid connect_to \"nonsense\""), "{e}");
    let http = text.replace("https://x", "http://x");
    assert!(load(&http).unwrap_err().to_string().contains("must start with https://"));
    let local_ca = GOOD.replace("file = \"secrets.toml\"", "file = \"secrets.toml\"\nca_file = \"ca.pem\"");
    assert!(load(&local_ca).unwrap_err().to_string().contains("only for Key Vault"));
}

#[test]
fn hmac_key_secret_needs_vault_and_name() {
    let with = |v: &str| GOOD.replace("durability = \"fsync\"", &format!("hmac_key_secret = {v:?}"));
    let c = load(&with("default/Audit-Key")).unwrap();
    let (vault, name) = c.audit.hmac_key_secret.unwrap();
    assert_eq!((vault.as_str(), name.as_str()), ("default", "Audit-Key"));
    let e = load(&with("audit-key")).unwrap_err().to_string();
    assert!(
        e.ends_with(
            "hmac_key_secret \"audit-key\": no vault given; write VAULT/NAME, like \"default/audit-key\""
        ),
        "{e}"
    );
    let e = load(&with("default/audit_key")).unwrap_err().to_string();
    assert!(e.contains("\"default/audit_key\": invalid secret name"), "{e}");
    let e = load(&with("de.fault/audit-key")).unwrap_err().to_string();
    assert!(e.contains("\"de.fault/audit-key\": invalid vault alias"), "{e}");
}

#[test]
fn line_at_counts_lines_from_one() {
    let text = "a = 1\nb = 2\n\nc = 3";
    assert_eq!(line_at(text, 0), 1);
    assert_eq!(line_at(text, 5), 1, "the newline itself ends line 1");
    assert_eq!(line_at(text, 6), 2);
    assert_eq!(line_at(text, 12), 3);
    assert_eq!(line_at(text, 13), 4);
    assert_eq!(line_at(text, 10_000), 4, "past the end is the last line");
    assert_eq!(line_at("", 3), 1);
}

/// Issue 18: `[kubernetes]` defaults (loopback, the service account's files), `NODE_NAME`,
/// and refusals of what cannot work.
#[test]
fn kubernetes_section() {
    let with = |k: &str, node: Option<&str>| {
        let node = node.map(str::to_owned);
        Config::from_toml_env(
            Path::new("/etc/kvbroker/config.toml"),
            &format!("{GOOD}\n[kubernetes]\n{k}"),
            &|v| {
                if v == "NODE_NAME" { node.clone() } else { None }
            },
        )
    };
    assert_eq!(load(GOOD).unwrap().kubernetes, None);
    let k = with("", None).unwrap().kubernetes.unwrap();
    assert_eq!(
        (k.kubelet_url.as_str(), k.host.as_str(), k.port),
        ("https://127.0.0.1:10250", "127.0.0.1", 10250)
    );
    assert_eq!(k.ca_file, Path::new("/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"));
    assert_eq!(k.token_file, Path::new("/var/run/secrets/kubernetes.io/serviceaccount/token"));
    assert_eq!(k.pod_cache_ttl, Duration::from_secs(10));
    let k = with("", Some("aks-nodepool1-123-vmss000000")).unwrap().kubernetes.unwrap();
    assert_eq!(k.kubelet_url, "https://aks-nodepool1-123-vmss000000:10250");
    let k = with(
        "kubelet_url = \"https://[::1]:11250\"\nca_file = \"ca.pem\"\npod_cache_ttl = \"2s\"\n",
        Some("n"),
    )
    .unwrap()
    .kubernetes
    .unwrap();
    assert_eq!((k.host.as_str(), k.port), ("[::1]", 11250));
    assert_eq!(k.ca_file, Path::new("/etc/kvbroker/ca.pem"), "relative to the config");
    assert_eq!(k.pod_cache_ttl, Duration::from_secs(2));
    for (bad, why) in [
        ("kubelet_url = \"http://127.0.0.1:10255\"", "write https://HOST:PORT"),
        ("kubelet_url = \"https://127.0.0.1:10250/pods\"", "write https://HOST:PORT"),
        ("pod_cache_ttl = \"10ms\"", "at least 1s"),
        ("kubelet_urls = \"x\"", "unknown field"),
    ] {
        let e = with(bad, None).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
    let e = with("", Some("node/../x")).unwrap_err().to_string();
    assert!(e.contains("NODE_NAME \"node/../x\" is not a host name"), "{e}");
}

/// Issue 16: metrics on a non-loopback address would let anyone on the network read them;
/// refused at load (so check-config refuses it too) unless the operator says so.
#[test]
fn metrics_listen_is_loopback_unless_allowed() {
    let c = load(&format!("{GOOD}\n[metrics]\nlisten = \"127.0.0.1:9464\"\nper_secret = true\n")).unwrap();
    assert_eq!(c.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
    assert!(c.metrics.per_secret);
    assert!(load(&format!("{GOOD}\n[metrics]\nlisten = \"[::1]:9464\"\n")).is_ok());
    let text = format!("{GOOD}\n[metrics]\nlisten = \"0.0.0.0:9464\"\n");
    let e = load(&text).unwrap_err().to_string();
    let line = text.lines().position(|l| l.starts_with("listen")).unwrap() + 1;
    assert!(e.starts_with(&format!("/etc/kvbroker/config.toml:{line}: ")), "names the line: {e}");
    assert!(e.contains("[metrics] listen 0.0.0.0:9464 is not a loopback address"), "{e}");
    assert!(e.contains("allow_remote = true"), "{e}");
    let c = load(&format!("{GOOD}\n[metrics]\nlisten = \"0.0.0.0:9464\"\nallow_remote = true\n")).unwrap();
    assert!(c.metrics.allow_remote);
    let e = load(&format!("{GOOD}\n[metrics]\nlisten = \"localhost\"\n")).unwrap_err().to_string();
    assert!(e.contains("write IP:PORT"), "{e}");
    let e = load(&format!("{GOOD}\n[metrics]\nlisten_on = \"127.0.0.1:1\"\n")).unwrap_err().to_string();
    assert!(e.contains("listen_on"), "{e}");
    assert_eq!(load(GOOD).unwrap().metrics.listen, None, "off by default");
}

#[test]
fn log_format_and_level() {
    let c = load(&format!("{GOOD}\n[log]\nformat = \"json\"\nlevel = \"debug\"\n")).unwrap();
    assert_eq!(c.log.format, LogFormat::Json);
    assert_eq!(c.log.level.as_deref(), Some("debug"));
    assert_eq!(load(GOOD).unwrap().log.format, LogFormat::Text);
    let e = load(&format!("{GOOD}\n[log]\nformat = \"xml\"\n")).unwrap_err().to_string();
    assert!(e.contains("xml"), "{e}");
    let e = load(&format!("{GOOD}\n[log]\nlevel = \"loud=[\"\n")).unwrap_err().to_string();
    assert!(e.contains("[log] level"), "{e}");
}

/// `[log]` is read before logging starts, ignoring the rest of the file.
#[test]
fn log_settings_read_only_the_log_section() {
    let dir = std::env::temp_dir().join(format!("kvbroker-logcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("config.toml");
    std::fs::write(&f, "[log]\nformat = \"json\"\nlevel = \"warn\"\n[whatever]\nx = 1\n").unwrap();
    let l = Config::log_settings(&f);
    assert_eq!((l.format, l.level.as_deref()), (LogFormat::Json, Some("warn")));
    std::fs::write(&f, "[log]\nformat = \"xml\"\n").unwrap();
    assert_eq!(Config::log_settings(&f).format, LogFormat::Text, "a bad [log] gives the defaults");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A `checkpoint_interval` of `0s` wrote a checkpoint record (and a log line) as fast as
/// the writer could, filling the disk: under a second is refused, a second is taken.
#[test]
fn checkpoint_interval_under_a_second_is_refused() {
    for short in ["0s", "1ms", "999ms"] {
        let text = GOOD.replace("[audit]\n", &format!("[audit]\ncheckpoint_interval = \"{short}\"\n"));
        let e = load(&text).unwrap_err().to_string();
        assert!(e.contains("checkpoint_interval must be at least 1s"), "{short}: {e}");
    }
    let text = GOOD.replace("[audit]\n", "[audit]\ncheckpoint_interval = \"1s\"\n");
    assert_eq!(load(&text).unwrap().audit.checkpoint_interval, Duration::from_secs(1));
}
