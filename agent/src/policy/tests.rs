use std::path::Path;

use super::*;

fn facts(uid: u32, gid: u32, groups: &[u32]) -> PeerFacts {
    let mut f = PeerFacts::given(uid, gid, groups.to_vec(), Some("/opt/conda/bin/python3.11".into()), None);
    f.set_cgroup_trusted("/system.slice/azureml-job.service");
    f
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
         add uids, gids, exe, exe_sha256, cgroup, systemd_unit, container_id or ancestor_exe"
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
    assert!(g("/a/*", "/a/b"));
    // Like a shell: `*` and `?` stop at `/` (issue 12: `*/torchrun` fitted /tmp/x/torchrun).
    assert!(!g("/a/*", "/a/b/c"));
    assert!(!g("*/torchrun", "/tmp/x/torchrun"));
    assert!(!g("/a?b", "/a/b"));
    assert!(g("/a/**", "/a/b/c"));
    assert!(g("/opt/**/python3", "/opt/python3"));
    assert!(g("/opt/**/python3", "/opt/a/b/python3"));
    assert!(!g("/opt/**/python3", "/opt/apython3"));
    assert!(!g("/opt/**/python3", "/optx/python3"));
    assert!(g("/opt/**/bin/python3*", "/opt/conda/envs/x/bin/python3.11"));
    assert!(!g("/opt/**/bin/python3*", "/opt/conda/envs/x/bin/python3/evil"));
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
    f.set_cgroup_trusted("/system.slice/azureml-train.service");
    assert_eq!(p.decide(&f, "default", "storage-key1"), Decision::Allow { rule: "train-jobs".into() });
    assert!(matches!(p.decide(&f, "default", "api-token-x"), Decision::Deny { .. }));
    assert_eq!(
        p.decide(&facts(5, 5, &[2000]), "default", "api-token-x"),
        Decision::Allow { rule: "mlops".into() }
    );
}

#[test]
fn systemd_unit_and_container_id_selectors() {
    let id = "4f9c8e1d2b3a4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5";
    let p = policy(&format!(
        "[[rule]]\nname = \"unit\"\nsystemd_unit = [\"azureml-*.service\"]\nsecrets = [\"v/a\"]\n\
         [[rule]]\nname = \"ctr\"\ncontainer_id = [\"{}*\"]\nsecrets = [\"v/b\"]\n",
        &id[..12]
    ));
    assert_eq!(p.decide(&facts(1, 1, &[]), "v", "a"), Decision::Allow { rule: "unit".into() });
    let mut f = facts(1, 1, &[]);
    f.set_cgroup_trusted(&format!("/kubepods.slice/kubepods-pod1.slice/cri-containerd-{id}.scope"));
    assert_eq!(p.decide(&f, "v", "b"), Decision::Allow { rule: "ctr".into() });
    assert!(matches!(p.decide(&facts(1, 1, &[]), "v", "b"), Decision::Deny { .. }));
}

#[test]
fn exe_sha256_matches_only_the_exact_file() {
    let dir = std::env::temp_dir().join(format!("kvb-pol-{}", fastrand::u64(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a"), dir.join("b"));
    std::fs::write(&a, b"binary one").unwrap();
    std::fs::write(&b, b"binary two").unwrap();
    let hash = crate::peer::exe_hash::sha256_of(a.to_str().unwrap()).unwrap();
    let p = policy(&format!(
        "[[rule]]\nname = \"h\"\nexe_sha256 = [\"{}\"]\nsecrets = [\"v/s\"]\n",
        hash.to_uppercase()
    ));
    let with = |path: &Path| PeerFacts::given(1, 1, vec![], Some(path.display().to_string()), None);
    assert_eq!(p.decide(&with(&a), "v", "s"), Decision::Allow { rule: "h".into() });
    assert!(matches!(p.decide(&with(&b), "v", "s"), Decision::Deny { .. }));
    assert!(
        err("[[rule]]\nname = \"h\"\nexe_sha256 = [\"abc\"]\nsecrets = [\"v/s\"]\n")
            .contains("64 hexadecimal")
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn explain_gives_every_reason() {
    let p = policy(
        "[[rule]]\nname = \"py\"\nuids = [1]\nexe = [\"/usr/bin/python3*\"]\nsecrets = [\"v/s\"]\n\
         [[rule]]\nname = \"grp\"\ngids = [7]\nsecrets = [\"v/*\"]\n",
    );
    let (verdicts, decision) = p.explain(&facts(1, 1, &[7]), "v", "s");
    assert_eq!(decision, Decision::Allow { rule: "grp".into() });
    assert_eq!(verdicts[0].checks[0], ("uids", true, "uid 1".to_owned()));
    assert_eq!(
        verdicts[0].checks[1],
        ("exe", false, "exe /opt/conda/bin/python3.11 fits no pattern".to_owned())
    );
    assert!(!verdicts[0].allows());
    assert_eq!(verdicts[1].checks[0], ("gids", true, "supplementary group 7".to_owned()));
    assert_eq!(verdicts[1].checks[1], ("secrets", true, "v/s fits \"v/*\"".to_owned()));
}

/// The reference semantics, written the slow obvious way: every way of splitting the text.
/// Byte 1 stands for a `**/` that does not start a segment (plain `**`, then a literal `/`).
fn reference(p: &[u8], t: &[u8]) -> bool {
    match p {
        [] => t.is_empty(),
        [1, rest @ ..] => (0..=t.len()).any(|i| reference(&[b"/", rest].concat(), &t[i..])),
        [b'*', b'*', b'/', rest @ ..] => {
            reference(rest, t) || (0..t.len()).any(|i| t[i] == b'/' && reference(rest, &t[i + 1..]))
        }
        [b'*', b'*', rest @ ..] => (0..=t.len()).any(|i| reference(rest, &t[i..])),
        [b'*', rest @ ..] => {
            (0..=t.len()).take_while(|&i| i == 0 || t[i - 1] != b'/').any(|i| reference(rest, &t[i..]))
        }
        [b'?', rest @ ..] => t.first().is_some_and(|&c| c != b'/') && reference(rest, &t[1..]),
        [c, rest @ ..] => t.first() == Some(c) && reference(rest, &t[1..]),
    }
}

/// The pattern as [`reference`] reads it: each `**/` that does not start a segment becomes
/// byte 1, as the matcher treats it.
fn marked(p: &str) -> Vec<u8> {
    let mut q = Vec::new();
    let mut i = 0;
    let pb = p.as_bytes();
    while i < pb.len() {
        if pb[i..].starts_with(b"**") {
            let dirs = pb.get(i + 2) == Some(&b'/') && (i == 0 || pb[i - 1] == b'/');
            if pb.get(i + 2) == Some(&b'/') && !dirs {
                q.push(1);
                i += 3;
            } else {
                q.extend_from_slice(b"**");
                i += 2;
            }
        } else {
            q.push(pb[i]);
            i += 1;
        }
    }
    q
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Pieces over a small alphabet, so that matches and near misses are both common.
    fn joined(pieces: &'static [&'static str], len: std::ops::Range<usize>) -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(pieces), len).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// The matcher agrees with [`reference`] on any pattern and path.
        #[test]
        fn glob_agrees_with_the_reference(p in joined(&["a", "b", "/", "*", "?", "**", "**/"], 0..8),
                                          t in joined(&["a", "b", "/"], 0..10)) {
            prop_assert_eq!(Glob::new(&p).matches(&t), reference(&marked(&p), t.as_bytes()),
                "pattern {:?} text {:?}", p, t);
        }

        /// A pattern without wildcards matches exactly itself; `*` never crosses a `/`.
        #[test]
        fn literals_match_only_themselves(p in joined(&["a", "b", "/", "-", "."], 0..10),
                                          t in joined(&["a", "b", "/", "-", "."], 0..10)) {
            prop_assert_eq!(Glob::new(&p).matches(&t), p == t);
            let star = format!("{p}*");
            prop_assert_eq!(Glob::new(&star).matches(&t), t.starts_with(&p) && !t[p.len()..].contains('/'));
        }
    }
}

mod kubernetes {
    use std::collections::BTreeMap;
    use std::sync::Arc;

    use super::*;
    use crate::kube::{Container, Pod};

    const UID: &str = "1a2b3c4d-5e6f-4a8b-9c0d-1e2f3a4b5c6d";
    const CTR: &str = "4f9c8e1d2b3a4c5d6e7f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5";

    fn k8s_policy(text: &str) -> Policy {
        Policy::from_toml_for(Path::new("policy.toml"), text, true).unwrap()
    }

    fn in_pod() -> PeerFacts {
        let mut f = PeerFacts::given(1000, 1000, vec![], Some("/usr/bin/python3".into()), None);
        f.set_cgroup_trusted(&format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{CTR}.scope",
            UID.replace('-', "_")
        ));
        f
    }

    fn found(ns: &str, sa: &str, labels: &[(&str, &str)]) -> PodLookup {
        PodLookup::Found(Arc::new(Pod {
            uid: UID.into(),
            name: "trainer-0".into(),
            namespace: ns.into(),
            service_account: sa.into(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            containers: vec![Container {
                name: "train".into(),
                image: "reg.example/ml/train:1.4".into(),
                image_id: Some(format!("reg.example/ml/train@sha256:{CTR}")),
                id: Some(CTR.into()),
            }],
        }))
    }

    const RULE: &str = r#"
[[rule]]
name = "trainers"
k8s_namespace = ["ml-prod"]
k8s_service_account = ["trainer"]
k8s_pod_label = ["app=train*", "team=ml"]
secrets = ["default/db-password"]
"#;

    /// Issue 18: a rule with only k8s selectors; the pod is asked for only when the rule is
    /// considered, and each selector must fit.
    #[test]
    fn namespace_service_account_and_labels() {
        let p = k8s_policy(RULE);
        let f = in_pod();
        let labels = [("app", "trainer"), ("team", "ml")];
        assert_eq!(p.decide(&f, "default", "db-password"), Decision::NeedPod);
        assert_eq!(
            p.decide(&f, "default", "other"),
            Decision::Deny { reason: "no rule matches".into() },
            "no lookup"
        );
        let allow = Decision::Allow { rule: "trainers".into() };
        assert_eq!(p.decide_with(&f, &found("ml-prod", "trainer", &labels), "default", "db-password"), allow);
        for pod in [
            found("ml-prod", "other", &labels),
            found("ml-dev", "trainer", &labels),
            found("ml-prod", "trainer", &[("app", "eval"), ("team", "ml")]),
            found("ml-prod", "trainer", &[("app", "trainer")]),
        ] {
            let d = p.decide_with(&f, &pod, "default", "db-password");
            assert_eq!(d, Decision::Deny { reason: "no rule matches".into() }, "{pod:?}");
        }
        let d = p.decide_with(&f, &PodLookup::NotFound, "default", "db-password");
        assert_eq!(
            d,
            Decision::Deny { reason: format!("no rule matches: pod {UID} not found on this node") }
        );
        let d =
            p.decide_with(&f, &PodLookup::Unavailable("connection refused".into()), "default", "db-password");
        assert!(
            matches!(d, Decision::KubeletUnavailable { reason } if reason.ends_with("connection refused"))
        );
    }

    /// A caller outside any pod never fits, and never causes a lookup; rules without k8s
    /// selectors decide as before, even with the kubelet down.
    #[test]
    fn callers_outside_pods_and_plain_rules_never_need_the_kubelet() {
        let p = k8s_policy(&format!(
            "{RULE}\n[[rule]]\nname = \"uid\"\nuids = [1000]\nsecrets = [\"default/*\"]\n"
        ));
        assert_eq!(
            p.decide(&facts(1000, 1000, &[]), "default", "db-password"),
            Decision::Allow { rule: "uid".into() }
        );
        assert_eq!(
            p.decide(&facts(7, 7, &[]), "default", "db-password"),
            Decision::Deny { reason: "no rule matches".into() }
        );
        let down = PodLookup::Unavailable("down".into());
        assert_eq!(
            p.decide_with(&in_pod(), &down, "default", "db-password"),
            Decision::Allow { rule: "uid".into() }
        );
        let mut outsider = in_pod();
        outsider.set_cgroup_trusted(&format!(
            "/user.slice/kubepods.slice/kubepods-pod{UID}.slice/cri-containerd-{CTR}.scope"
        ));
        let d = p.decide_with(
            &outsider,
            &found("ml-prod", "trainer", &[("app", "trainer"), ("team", "ml")]),
            "default",
            "x",
        );
        assert_eq!(d, Decision::Allow { rule: "uid".into() });
        let only = k8s_policy(RULE);
        let d = only.decide_with(
            &outsider,
            &found("ml-prod", "trainer", &[("app", "t"), ("team", "ml")]),
            "default",
            "db-password",
        );
        assert_eq!(d, Decision::Deny { reason: "no rule matches".into() }, "a look-alike path is no pod");
    }

    #[test]
    fn container_name_and_image_by_glob_and_digest() {
        let f = in_pod();
        let pod = found("ml-prod", "trainer", &[]);
        let fits = |sel: &str| {
            let p = k8s_policy(&format!("[[rule]]\nname = \"r\"\n{sel}\nsecrets = [\"v/s\"]\n"));
            matches!(p.decide_with(&f, &pod, "v", "s"), Decision::Allow { .. })
        };
        assert!(fits("k8s_container_name = [\"train\"]"));
        assert!(!fits("k8s_container_name = [\"sidecar\"]"));
        assert!(fits("k8s_pod_name = [\"trainer-*\"]"));
        assert!(fits("k8s_container_image = [\"reg.example/ml/train:1.*\"]"));
        assert!(!fits("k8s_container_image = [\"reg.example/*:1.4\"]"), "* stops at /");
        assert!(fits(&format!("k8s_container_image = [\"sha256:{CTR}\"]")));
        assert!(fits(&format!("k8s_container_image = [\"reg.example/ml/*@sha256:{CTR}\"]")));
        assert!(!fits(&format!("k8s_container_image = [\"sha256:{}\"]", "0".repeat(64))));
    }

    /// Without `[kubernetes]`, k8s selectors are refused at load, with the line.
    #[test]
    fn k8s_selectors_need_the_kubernetes_section() {
        assert_eq!(
            err(RULE),
            "policy.toml:2: rule \"trainers\": k8s_namespace needs the agent config's [kubernetes] section \
             (how to ask the node's kubelet): add it, or remove the k8s_* selectors"
        );
        let bad = Policy::from_toml_for(
            Path::new("p.toml"),
            "[[rule]]\nname = \"r\"\nk8s_pod_label = [\"app\"]\nsecrets = [\"v/s\"]\n",
            true,
        );
        assert!(bad.unwrap_err().to_string().contains("KEY=VALUE-GLOB"));
        let empty = Policy::from_toml_for(
            Path::new("p.toml"),
            "[[rule]]\nname = \"r\"\nk8s_namespace = []\nsecrets = [\"v/s\"]\n",
            true,
        );
        assert!(empty.unwrap_err().to_string().contains("k8s_namespace is an empty list"));
    }
}

/// A policy of many rules loads in linear time (finding each rule's line rescanned the text
/// from its start, and each name was compared with every earlier one: 82 s for 10,000
/// rules), and lines are still counted right: a duplicate name far down is named at its line.
#[test]
fn a_policy_of_many_rules_loads_quickly_with_right_lines() {
    let n = 20_000;
    let mut text: String = (0..n)
        .map(|i| {
            format!("# rule {i}\n[[rule]]\nname = \"r{i}\"\nuids = [{i}]\nsecrets = [\"default/s{i}\"]\n\n")
        })
        .collect();
    let started = std::time::Instant::now();
    let p = policy(&text);
    let took = started.elapsed();
    assert_eq!(p.len(), n);
    // Linear is well under a second here, even unoptimized; quadratic took minutes.
    assert!(took < std::time::Duration::from_secs(20), "{n} rules took {took:?}");
    text.push_str("[[rule]]\nname = \"r7\"\nuids = [1]\nsecrets = [\"default/x\"]\n");
    let e = err(&text);
    let line = n * 6 + 1;
    assert!(e.contains(&format!("policy.toml:{line}:")), "{e}");
    assert!(e.contains("name is used by an earlier rule"), "{e}");
}
