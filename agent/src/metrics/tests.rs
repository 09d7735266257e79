use super::*;

/// The value of the one sample `series` (name and labels, as rendered) in `text`.
fn sample(text: &str, series: &str) -> f64 {
    let mut found = text.lines().filter_map(|l| l.strip_prefix(series)?.strip_prefix(' '));
    let v = found.next().unwrap_or_else(|| panic!("no sample {series} in\n{text}"));
    assert!(found.next().is_none(), "{series} twice");
    v.parse().unwrap()
}

#[test]
fn every_metric_is_rendered_from_the_start() {
    let m = Metrics::new();
    m.register_vault("default");
    let text = m.render(Snapshot { cache_entries: 3, stale_entries: 1 });
    for name in [
        "kvbroker_secret_reads_total{outcome=\"allowed\",cache=\"hit\"}",
        "kvbroker_secret_reads_total{outcome=\"denied\",cache=\"none\"}",
        "kvbroker_secret_read_errors_total{code=\"AuditUnavailable\"}",
        "kvbroker_denials_total{reason=\"policy\"}",
        "kvbroker_rate_limited_total{limit=\"rate\"}",
        "kvbroker_connections{state=\"idle\"}",
        "kvbroker_vault_calls_total{vault=\"default\",status=\"unavailable\"}",
        "kvbroker_vault_call_duration_seconds_count{vault=\"default\"}",
        "kvbroker_audit_records_total",
        "kvbroker_audit_write_failures_total",
        "kvbroker_exec_events_active",
        "kvbroker_exec_events_lost_total",
        "kvbroker_peer_rechecks_total",
    ] {
        assert_eq!(sample(&text, name), 0.0, "{name}");
    }
    assert_eq!(sample(&text, "kvbroker_cache_entries"), 3.0);
    assert_eq!(sample(&text, "kvbroker_cache_stale_entries"), 1.0);
    assert_eq!(
        sample(&text, &format!("kvbroker_build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"))),
        1.0
    );
    assert!(text.ends_with("# EOF\n"), "OpenMetrics text ends with # EOF");
}

#[test]
fn counters_move_by_what_happened() {
    let m = Metrics::new();
    m.read(ReadOutcome::Allowed, CacheUse::Miss, None);
    m.read(ReadOutcome::Allowed, CacheUse::Hit, None);
    m.read(ReadOutcome::Allowed, CacheUse::Hit, None);
    m.read(ReadOutcome::Denied, CacheUse::None, Some(ErrorCode::PermissionDenied));
    m.denied(DenyReason::Policy);
    m.limited(Limit::Rate);
    m.conn_opened(false);
    m.conn_opened(false);
    m.busy(true);
    m.conn_opened(true);
    m.audit_written(2, 700, Duration::from_micros(80));
    let text = m.render(Snapshot::default());
    assert_eq!(sample(&text, "kvbroker_secret_reads_total{outcome=\"allowed\",cache=\"hit\"}"), 2.0);
    assert_eq!(sample(&text, "kvbroker_secret_reads_total{outcome=\"allowed\",cache=\"miss\"}"), 1.0);
    assert_eq!(sample(&text, "kvbroker_secret_reads_total{outcome=\"denied\",cache=\"none\"}"), 1.0);
    assert_eq!(sample(&text, "kvbroker_secret_read_errors_total{code=\"PermissionDenied\"}"), 1.0);
    assert_eq!(sample(&text, "kvbroker_denials_total{reason=\"policy\"}"), 1.0);
    assert_eq!(sample(&text, "kvbroker_rate_limited_total{limit=\"rate\"}"), 1.0);
    assert_eq!(sample(&text, "kvbroker_connections{state=\"busy\"}"), 1.0);
    assert_eq!(sample(&text, "kvbroker_connections{state=\"idle\"}"), 1.0);
    assert_eq!(sample(&text, "kvbroker_connections{state=\"refusing\"}"), 1.0);
    assert_eq!(sample(&text, "kvbroker_audit_records_total"), 2.0);
    assert_eq!(sample(&text, "kvbroker_audit_bytes_total"), 700.0);
    assert_eq!(sample(&text, "kvbroker_audit_write_duration_seconds_bucket{le=\"0.0001\"}"), 1.0);
}

/// A vault is "failing" from its first unavailable answer until its next success; 404s and
/// disabled secrets are the vault answering.
#[test]
fn vault_failing_time_runs_until_a_success() {
    let m = Metrics::new();
    m.vault_call("kv", VaultStatus::NotFound, Duration::from_millis(2));
    assert!(m.vaults_failing_for(Duration::ZERO).is_empty());
    m.vault_call("kv", VaultStatus::Unavailable, Duration::from_millis(2));
    std::thread::sleep(Duration::from_millis(20));
    m.vault_call("kv", VaultStatus::Unavailable, Duration::from_millis(2));
    let failing = m.vaults_failing_for(Duration::from_millis(10));
    assert_eq!(failing.len(), 1, "measured from the first failure: {failing:?}");
    assert_eq!(failing[0].vault, "kv");
    assert!(failing[0].last_attempt < failing[0].failing_for, "{failing:?}");
    assert!(m.vaults_failing_for(Duration::from_secs(60)).is_empty());
    let text = m.render(Snapshot::default());
    assert_eq!(sample(&text, "kvbroker_vault_calls_total{vault=\"kv\",status=\"unavailable\"}"), 2.0);
    assert!(sample(&text, "kvbroker_vault_failing_seconds{vault=\"kv\"}") >= 0.01);
    m.vault_call("kv", VaultStatus::Ok, Duration::from_millis(2));
    assert!(m.vaults_failing_for(Duration::ZERO).is_empty());
    let text = m.render(Snapshot::default());
    assert_eq!(sample(&text, "kvbroker_vault_failing_seconds{vault=\"kv\"}"), 0.0);
    assert!(sample(&text, "kvbroker_vault_seconds_since_success{vault=\"kv\"}") < 1.0);
}

/// Secret names are labels only with `per_secret`, and then in the vault's own key form.
#[test]
fn secret_names_are_labels_only_when_asked() {
    let m = Metrics::new();
    m.read_of("default", "Db-Password");
    assert!(!m.render(Snapshot::default()).to_lowercase().contains("db-password"));
    m.set_per_secret(true);
    m.read_of("default", "Db-Password");
    let text = m.render(Snapshot::default());
    assert_eq!(
        sample(&text, "kvbroker_secret_reads_by_name_total{vault=\"default\",secret=\"db-password\"}"),
        1.0
    );
}

#[test]
fn token_acquisitions_by_source_and_result() {
    let m = Metrics::new();
    m.token("imds", true);
    m.token("imds", false);
    m.token("imds", true);
    let text = m.render(Snapshot::default());
    assert_eq!(sample(&text, "kvbroker_token_acquisitions_total{source=\"imds\",result=\"ok\"}"), 2.0);
    assert_eq!(sample(&text, "kvbroker_token_acquisitions_total{source=\"imds\",result=\"error\"}"), 1.0);
}

/// The counters are held in arrays indexed by the enums: each enum's `ALL` must list its
/// variants in declaration order, or a read would count under another label.
#[test]
fn label_arrays_are_indexed_by_declaration_order() {
    assert!(ReadOutcome::ALL.iter().enumerate().all(|(i, v)| *v as usize == i));
    assert!(CacheUse::ALL.iter().enumerate().all(|(i, v)| *v as usize == i));
    assert!(DenyReason::ALL.iter().enumerate().all(|(i, v)| *v as usize == i));
    assert!(Limit::ALL.iter().enumerate().all(|(i, v)| *v as usize == i));
    assert!(VaultStatus::ALL.iter().enumerate().all(|(i, v)| *v as usize == i));
    let m = Metrics::new();
    m.read(ReadOutcome::Error, CacheUse::Stale, None);
    m.denied(DenyReason::NotLaunched);
    m.limited(Limit::Connections);
    let text = m.render(Snapshot::default());
    assert_eq!(sample(&text, "kvbroker_secret_reads_total{outcome=\"error\",cache=\"stale\"}"), 1.0);
    assert_eq!(sample(&text, "kvbroker_denials_total{reason=\"not_launched\"}"), 1.0);
    assert_eq!(sample(&text, "kvbroker_rate_limited_total{limit=\"connections\"}"), 1.0);
}

/// Drift: every metric the agent renders is documented in docs/metrics.md (under the name a
/// scrape shows), and the doc names no metric the agent does not have.
#[test]
fn docs_list_every_metric() {
    let m = Metrics::new();
    m.set_per_secret(true);
    m.read_of("v", "s");
    m.register_vault("v");
    m.token("imds", true);
    let text = m.render(Snapshot::default());
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md")).unwrap();
    let mut rendered = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, ty) = rest.split_once(' ').unwrap();
            let shown = match ty {
                "counter" => format!("{name}_total"),
                "info" => format!("{name}_info"),
                _ => name.to_owned(),
            };
            assert!(docs.contains(&format!("| `{shown}` |")), "docs/metrics.md has no row for {shown}");
            rendered.push(shown);
        }
    }
    for row in docs.lines().filter_map(|l| l.strip_prefix("| `kvbroker_")) {
        let name = format!("kvbroker_{}", &row[..row.find('`').unwrap()]);
        assert!(
            rendered.contains(&name),
            "docs/metrics.md documents {name}, which the agent does not render"
        );
    }
}
