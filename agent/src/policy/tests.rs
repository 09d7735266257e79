use super::*;

fn facts(uid: u32, gid: u32, groups: &[u32]) -> PeerFacts {
    PeerFacts {
        pid: 42,
        uid,
        gid,
        groups: groups.to_vec(),
        exe: Some("/opt/conda/bin/python3.11".into()),
        cgroup: Some("/system.slice/azureml-job.service".into()),
    }
}

fn policy(text: &str) -> Policy {
    Policy::from_toml(Path::new("policy.toml"), text).unwrap()
}

fn err(text: &str) -> String {
    Policy::from_toml(Path::new("policy.toml"), text).unwrap_err().to_string()
}

#[test]
fn denies_when_no_rule_matches() {
    let p = policy("");
    assert_eq!(
        p.decide(&facts(0, 0, &[]), "default", "x"),
        Decision::Deny { reason: "no rule matches".into() }
    );
}

#[test]
fn allows_by_uid_and_secret_pattern() {
    let p = policy(
        r#"
[[rule]]
name = "train"
uids = [1000]
secrets = ["default/db-*"]
"#,
    );
    let allow = Decision::Allow { rule: "train".into() };
    assert_eq!(p.decide(&facts(1000, 1000, &[]), "default", "db-password"), allow);
    assert!(matches!(p.decide(&facts(1001, 1000, &[]), "default", "db-password"), Decision::Deny { .. }));
    assert!(matches!(p.decide(&facts(1000, 1000, &[]), "other", "db-password"), Decision::Deny { .. }));
    assert!(matches!(p.decide(&facts(1000, 1000, &[]), "default", "api"), Decision::Deny { .. }));
}

#[test]
fn gids_match_primary_or_supplementary() {
    let p = policy("[[rule]]\nname = \"g\"\ngids = [2000]\nsecrets = [\"*/*\"]\n");
    assert!(matches!(p.decide(&facts(5, 2000, &[]), "v", "s"), Decision::Allow { .. }));
    assert!(matches!(p.decide(&facts(5, 5, &[7, 2000]), "v", "s"), Decision::Allow { .. }));
    assert!(matches!(p.decide(&facts(5, 5, &[7]), "v", "s"), Decision::Deny { .. }));
}

#[test]
fn every_selector_must_fit() {
    let p = policy(
        "[[rule]]\nname = \"r\"\nuids = [1]\nexe = [\"/opt/conda/bin/python3*\"]\n\
         cgroup = [\"/system.slice/azureml-*\"]\nsecrets = [\"v/s\"]\n",
    );
    assert!(matches!(p.decide(&facts(1, 1, &[]), "v", "s"), Decision::Allow { .. }));
    let mut f = facts(1, 1, &[]);
    f.exe = Some("/usr/bin/python3.11".into());
    assert!(matches!(p.decide(&f, "v", "s"), Decision::Deny { .. }));
    let mut f = facts(1, 1, &[]);
    f.cgroup = None;
    assert!(matches!(p.decide(&f, "v", "s"), Decision::Deny { .. }));
}

#[test]
fn secret_patterns_are_case_insensitive_on_names() {
    let p = policy("[[rule]]\nname = \"r\"\nuids = [1]\nsecrets = [\"default/DB-Password\"]\n");
    assert!(matches!(p.decide(&facts(1, 1, &[]), "default", "db-password"), Decision::Allow { .. }));
}

#[test]
fn rule_without_selector_is_refused_with_line() {
    let e = err("\n\n[[rule]]\nname = \"open\"\nsecrets = [\"*/*\"]\n");
    assert_eq!(
        e,
        "policy.toml:3: rule \"open\": has no selector, so it would match every caller: \
         add uids, gids, exe or cgroup"
    );
}

#[test]
fn unknown_selector_is_refused_with_line() {
    let e = err("[[rule]]\nname = \"r\"\ncmdline = [\"x\"]\nsecrets = [\"*/*\"]\n");
    assert!(e.starts_with("policy.toml:3: "), "{e}");
    assert!(e.contains("cmdline"), "{e}");
}

#[test]
fn bad_secret_pattern_and_empty_lists_are_refused() {
    assert!(err("[[rule]]\nname = \"r\"\nuids = [1]\nsecrets = [\"nodash\"]\n").contains("VAULT/NAME"));
    assert!(
        err("[[rule]]\nname = \"r\"\nuids = []\nsecrets = [\"a/b\"]\n").contains("uids is an empty list")
    );
    assert!(err("[[rule]]\nname = \"r\"\nuids = [1]\nsecrets = []\n").contains("secrets is empty"));
}

#[test]
fn glob_matching() {
    let g = |p: &str, t: &str| Glob::new(p).matches(t);
    assert!(g("*", ""));
    assert!(g("/a/*", "/a/b/c"));
    assert!(g("a?c", "abc"));
    assert!(!g("a?c", "ac"));
    assert!(g("*b*b*", "abxbc"));
    assert!(!g("/a/*/d", "/a/b/c"));
    assert!(g("python3*", "python3"));
    assert!(!g("abc", "abcd"));
}

/// Drift test: the shipped example policy loads and means what its comments say.
#[test]
fn example_policy_loads() {
    let p = policy(include_str!("../../../deploy/policy.example.toml"));
    let mut f = facts(1000, 1000, &[]);
    f.cgroup = Some("/system.slice/azureml-train.service".into());
    assert_eq!(p.decide(&f, "default", "storage-key1"), Decision::Allow { rule: "train-jobs".into() });
    assert!(matches!(p.decide(&f, "default", "api-token-x"), Decision::Deny { .. }));
    assert_eq!(
        p.decide(&facts(5, 5, &[2000]), "default", "api-token-x"),
        Decision::Allow { rule: "mlops".into() }
    );
}
