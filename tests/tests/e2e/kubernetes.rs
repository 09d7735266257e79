//! Policy by Kubernetes pod (issue 18): real processes placed into kubepods-shaped cgroups
//! this test creates (and removes on drop), an agent asking a kubelet stand-in on 127.0.0.1
//! (`kvbroker_tests::kubelet`) about the pods in `tests/fixtures/kubelet-pod.json`.
//!
//! The tests share the cgroup root's `kubepods.slice` and `kubepods`, so they run one at a
//! time (a lock), each removing what it made.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use kvbroker_tests::kubelet::{Kubelet, KubeletMode, fixture};
use kvbroker_tests::{Agent, Proc, bin, canary, run};
use serde_json::Value;

use super::policy::Cgroups;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The fixture's pods: (pod UID, container id).
const TRAINER: (&str, &str) = ("1a2b3c4d-5e6f-4a8b-9c0d-000000000a01", "a1");
const OTHER_SA: (&str, &str) = ("1a2b3c4d-5e6f-4a8b-9c0d-000000000b02", "b2");
const OTHER_NS: (&str, &str) = ("1a2b3c4d-5e6f-4a8b-9c0d-000000000c03", "c3");
const OTHER_LABEL: (&str, &str) = ("1a2b3c4d-5e6f-4a8b-9c0d-000000000d04", "d4");
const TRAINER_CGROUPFS: (&str, &str) = ("1a2b3c4d-5e6f-4a8b-9c0d-000000000f06", "f6");
/// A pod the kubelet does not list.
const UNKNOWN: (&str, &str) = ("1a2b3c4d-5e6f-4a8b-9c0d-000000000e05", "e5");

fn ctr(pod: (&str, &str)) -> String {
    pod.1.repeat(32)
}

const RULES: &[&str] = &[
    "name = \"trainers\"\nk8s_namespace = [\"ml-prod\"]\nk8s_service_account = [\"trainer\"]\n\
     k8s_pod_label = [\"app=trainer\"]\nsecrets = [\"default/db-password\"]",
    "name = \"root-plain\"\nuids = [0]\nsecrets = [\"default/plain\"]",
];

/// The systemd driver's cgroup for a container of pod `pod` in QoS class `qos`.
fn pod_cgroup(cgs: &mut Cgroups, qos: &str, pod: (&str, &str)) -> PathBuf {
    let uid = pod.0.replace('-', "_");
    let rel = match qos {
        "guaranteed" => {
            format!("/kubepods.slice/kubepods-pod{uid}.slice/cri-containerd-{}.scope", ctr(pod))
        }
        q => format!(
            "/kubepods.slice/kubepods-{q}.slice/kubepods-{q}-pod{uid}.slice/cri-containerd-{}.scope",
            ctr(pod)
        ),
    };
    cgs.make_all(&rel, 0, None)
}

/// `curl` for `/v1/secrets/NAME`, run after moving itself into the cgroup `dir`:
/// (HTTP status, body, seconds taken).
fn read_in(dir: &Path, socket: &Path, name: &str) -> (u16, String, f64) {
    let script = r#"echo $$ > "$1/cgroup.procs" && exec curl -s -w '\n%{http_code}' --unix-socket "$2" "http://localhost/v1/secrets/$3""#;
    let started = Instant::now();
    let (code, out, err) = run(Command::new("sh").args(["-c", script, "sh"]).arg(dir).arg(socket).arg(name));
    let took = started.elapsed().as_secs_f64();
    assert_eq!(code, 0, "curl: {err}");
    let (body, status) = out.rsplit_once('\n').unwrap();
    (status.parse().unwrap(), body.to_owned(), took)
}

/// The same, from the test's own cgroup (outside any pod).
fn read_outside(socket: &Path, name: &str) -> (u16, String, f64) {
    let started = Instant::now();
    let (_, out, _) = kvbroker_tests::curl(socket, &format!("/v1/secrets/{name}"), None, &[]);
    let (body, status) = out.rsplit_once('\n').unwrap();
    (status.parse().unwrap(), body.to_owned(), started.elapsed().as_secs_f64())
}

fn reads(agent: &Agent) -> Vec<Value> {
    agent.audit_records().into_iter().filter(|r| r["event"] == "secret.read").collect()
}

fn agent(kubelet: &Kubelet, ttl: &str, value: &str) -> Agent {
    let mut b = Agent::builder("k8s").secret("db-password", value).secret("plain", value);
    for r in RULES {
        b = b.rule(r);
    }
    b.section(&kubelet.config_section(ttl)).start()
}

/// Issue 18: pods of the allowed namespace and service account (with the label) are served,
/// whichever cgroup driver and QoS class; another service account, another namespace, a
/// label mismatch and a pod the kubelet does not list are denied; a look-alike pod cgroup
/// made in a delegated subtree is no pod. The audit record and `policy explain --pid` name
/// the pod. The kubelet is asked once for a burst, and never for a caller outside pods.
#[test]
fn pods_are_judged_by_namespace_service_account_and_labels() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let value = canary("k8s");
    let token = canary("k8s-token");
    let kubelet = Kubelet::start(&fixture("kubelet-pod.json"), &token);
    let agent = agent(&kubelet, "30s", &value);
    let mut cgs = Cgroups::default();
    let trainer = pod_cgroup(&mut cgs, "burstable", TRAINER);
    let other_sa = pod_cgroup(&mut cgs, "besteffort", OTHER_SA);
    let other_ns = pod_cgroup(&mut cgs, "guaranteed", OTHER_NS);
    let other_label = pod_cgroup(&mut cgs, "burstable", OTHER_LABEL);
    let unknown = pod_cgroup(&mut cgs, "burstable", UNKNOWN);
    let cgroupfs = cgs.make_all(
        &format!("/kubepods/burstable/pod{}/{}", TRAINER_CGROUPFS.0, ctr(TRAINER_CGROUPFS)),
        0,
        None,
    );
    // The trainer's exact path, inside a subtree handed to uid 65534 (as systemd delegates to
    // a user session or a container runtime).
    let tag = format!("kvbtest-{:x}", std::process::id());
    let look_alike_rel = format!(
        "/{tag}-delegated.slice/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{}.scope",
        TRAINER.0.replace('-', "_"),
        ctr(TRAINER)
    );
    let look_alike = cgs.make_all(&look_alike_rel, 65534, Some(&format!("/{tag}-delegated.slice")));

    let (status, body, _) = read_in(&trainer, &agent.socket, "db-password");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(&value));
    assert_eq!(kubelet.calls(), 1);
    assert_eq!(read_in(&trainer, &agent.socket, "db-password").0, 200);
    assert_eq!(kubelet.calls(), 1, "a known pod within pod_cache_ttl: no kubelet call");
    assert_eq!(read_outside(&agent.socket, "plain").0, 200);
    assert_eq!(read_outside(&agent.socket, "db-password").0, 403);
    assert_eq!(kubelet.calls(), 1, "a caller outside pods never makes the agent ask the kubelet");

    for (dir, what) in [
        (&other_sa, "another service account"),
        (&other_ns, "another namespace"),
        (&other_label, "label mismatch"),
    ] {
        let (status, body, _) = read_in(dir, &agent.socket, "db-password");
        assert_eq!(status, 403, "{what}: {body}");
        assert!(!body.contains(&value));
    }
    let (status, body, _) = read_in(&unknown, &agent.socket, "db-password");
    assert_eq!(status, 403, "{body}");
    assert!(body.contains(&format!("pod {} not found on this node", UNKNOWN.0)), "{body}");
    let (status, body, _) = read_in(&look_alike, &agent.socket, "db-password");
    assert_eq!(status, 403, "look-alike: {body}");
    let (status, body, _) = read_in(&cgroupfs, &agent.socket, "db-password");
    assert_eq!(status, 200, "cgroupfs driver: {body}");

    let recs = reads(&agent);
    let pod_recs: Vec<&Value> = recs.iter().filter(|r| r["secret"]["name"] == "db-password").collect();
    let outcomes: Vec<&str> = pod_recs.iter().map(|r| r["outcome"].as_str().unwrap()).collect();
    assert_eq!(
        outcomes,
        ["allowed", "allowed", "denied", "denied", "denied", "denied", "denied", "denied", "allowed"]
    );
    let p = &pod_recs[0]["peer"];
    assert_eq!(pod_recs[0]["rule"], "trainers");
    assert_eq!(
        (
            &p["k8s_namespace"],
            &p["k8s_service_account"],
            &p["k8s_pod_name"],
            &p["k8s_pod_uid"],
            &p["k8s_container_name"]
        ),
        (
            &Value::from("ml-prod"),
            &Value::from("trainer"),
            &Value::from("trainer-0"),
            &Value::from(TRAINER.0),
            &Value::from("train")
        )
    );
    assert_eq!(p["container_id"], ctr(TRAINER));
    assert!(pod_recs[2]["peer"].get("k8s_pod_uid").is_none(), "the caller outside any pod");
    assert_eq!(pod_recs[3]["peer"]["k8s_service_account"], "evaluator");
    assert_eq!(pod_recs[4]["peer"]["k8s_namespace"], "ml-dev");
    assert_eq!(pod_recs[5]["peer"]["k8s_pod_name"], "eval-1");
    assert_eq!(pod_recs[6]["reason"], format!("no rule matches: pod {} not found on this node", UNKNOWN.0));
    assert_eq!(pod_recs[6]["peer"]["k8s_pod_uid"], UNKNOWN.0);
    let la = &pod_recs[7]["peer"];
    assert_eq!(la["cgroup"], look_alike_rel.as_str());
    assert!(la.get("k8s_pod_uid").is_none() && la.get("container_id").is_none(), "{la}");
    assert_eq!(pod_recs[7]["reason"], "no rule matches");
    assert_eq!(pod_recs[8]["peer"]["k8s_pod_name"], "trainer-1");

    // `policy explain --pid` shows what the kubelet says about a pod's process.
    let mut sleeper = Proc::spawn(
        Command::new("sh")
            .args(["-c", r#"echo $$ > "$1/cgroup.procs" && exec sleep 30"#, "sh"])
            .arg(&trainer),
    );
    let cg_of = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cg_of(sleeper.pid()).contains("cri-containerd") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, out, err) = run(Command::new(bin("kvbroker"))
        .args(["policy", "explain", "--config"])
        .arg(&agent.config)
        .args(["--pid", &sleeper.pid().to_string(), "default/db-password"]));
    assert_eq!((code, err.as_str()), (0, ""), "{out}");
    for line in [
        format!("  k8s_pod_uid   {} (cgroup segment 3)\n", TRAINER.0),
        "  k8s_namespace ml-prod\n".to_owned(),
        "  k8s_service_account trainer\n".to_owned(),
        "  k8s_pod_name  trainer-0\n".to_owned(),
        "  k8s_container_name train\n".to_owned(),
        "  k8s_namespace yes  namespace ml-prod fits \"ml-prod\"\n".to_owned(),
        "decision: allowed by rule \"trainers\"".to_owned(),
    ] {
        assert!(out.contains(&line), "{line:?} not in:\n{out}");
    }
    sleeper.signal(libc::SIGKILL);
    let _ = sleeper.wait_timeout(Duration::from_secs(5));
    drop(sleeper);

    agent.assert_no_canary(&[&value, &token], &[&out]);
    drop(agent);
    drop(cgs);
}

/// Issue 18: the token is read again at each kubelet call. The kubelet stops accepting the
/// old one: reads by pod rules fail closed (502, naming the 401); once the new token is in
/// the file, they are served again — without restarting the agent.
#[test]
fn a_rotated_token_is_picked_up() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let value = canary("k8s-rot");
    let (old, new) = (canary("k8s-token-old"), canary("k8s-token-new"));
    let kubelet = Kubelet::start(&fixture("kubelet-pod.json"), &old);
    let agent = agent(&kubelet, "1s", &value);
    let mut cgs = Cgroups::default();
    let trainer = pod_cgroup(&mut cgs, "burstable", TRAINER);
    assert_eq!(read_in(&trainer, &agent.socket, "db-password").0, 200);

    kubelet.accept_only(&new);
    std::thread::sleep(Duration::from_millis(1_100));
    let (status, body, _) = read_in(&trainer, &agent.socket, "db-password");
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("401"), "{body}");
    assert_eq!(kubelet.refused(), 1);

    kubelet.write_token_file(&new);
    std::thread::sleep(Duration::from_millis(1_100));
    let (status, body, _) = read_in(&trainer, &agent.socket, "db-password");
    assert_eq!(status, 200, "{body}");
    assert_eq!(kubelet.calls(), 2);

    let recs = reads(&agent);
    assert_eq!(recs[1]["outcome"], "error");
    assert_eq!(recs[1]["error"], "UpstreamUnavailable");

    // A reload (SIGHUP) keeps accepting k8s selectors: the agent has [kubernetes].
    agent.proc.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    let reloaded = || agent.audit_records().into_iter().find(|r| r["event"] == "policy.reload");
    while reloaded().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = reloaded().expect("a policy.reload record");
    assert_eq!(r["outcome"], "ok", "{r}");
    agent.assert_no_canary(&[&value, &old, &new], &[]);
    drop(agent);
    drop(cgs);
}

/// Issue 18: a kubelet that answers too much, hangs, or is gone: reads by pod rules fail
/// closed with 502 within the bounded wait (3 s) and a clear reason, while a rule without
/// k8s selectors serves at once.
#[test]
fn kubelet_down_fails_closed_within_a_bounded_time_while_other_rules_work() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let value = canary("k8s-down");
    let token = canary("k8s-token");
    let mut kubelet = Kubelet::start(&fixture("kubelet-pod.json"), &token);
    let agent = agent(&kubelet, "1s", &value);
    let mut cgs = Cgroups::default();
    let trainer = pod_cgroup(&mut cgs, "burstable", TRAINER);

    kubelet.set_mode(KubeletMode::Oversize);
    let (status, body, _) = read_in(&trainer, &agent.socket, "db-password");
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("larger than 16 MiB"), "{body}");
    std::thread::sleep(Duration::from_millis(1_100));

    kubelet.set_mode(KubeletMode::Hang);
    let (status, body, took) = read_in(&trainer, &agent.socket, "db-password");
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("did not answer within 3s"), "{body}");
    assert!((2.5..6.0).contains(&took), "waited {took:.2}s");
    let (status, _, took) = read_outside(&agent.socket, "plain");
    assert_eq!(status, 200);
    assert!(took < 1.5, "a rule without k8s selectors waited {took:.2}s");

    kubelet.stop();
    let (status, body, took) = read_in(&trainer, &agent.socket, "db-password");
    assert_eq!(status, 502, "{body}");
    assert!(took < 6.0, "waited {took:.2}s");
    assert_eq!(read_outside(&agent.socket, "plain").0, 200);

    let recs = reads(&agent);
    for r in recs.iter().filter(|r| r["secret"]["name"] == "db-password") {
        assert_eq!(
            (r["outcome"].as_str(), r["error"].as_str()),
            (Some("error"), Some("UpstreamUnavailable")),
            "{r}"
        );
        assert!(
            r["reason"]
                .as_str()
                .unwrap()
                .starts_with("cannot judge the caller's pod: the kubelet is unavailable"),
            "{r}"
        );
    }
    agent.assert_no_canary(&[&value, &token], &[]);
    drop(agent);
    drop(cgs);
}

/// Issue 18: without a `[kubernetes]` section, a policy with `k8s_*` selectors is refused at
/// load — by `check-config` and by `run` — naming the file and line.
#[test]
fn k8s_selectors_without_the_kubernetes_section_are_refused_at_load() {
    let mut b = Agent::builder("k8s-nosection").secret("db-password", "x");
    for r in RULES {
        b = b.rule(r);
    }
    let config = b.write();
    let dir = b.into_dir();
    let want = format!(
        "kvbroker: {}:1: rule \"trainers\": k8s_namespace needs the agent config's [kubernetes] section \
         (how to ask the node's kubelet): add it, or remove the k8s_* selectors\n",
        dir.path().join("policy.toml").display()
    );
    let (code, _, err) = run(Command::new(bin("kvbroker")).args(["check-config", "--config"]).arg(&config));
    assert_eq!((code, err.as_str()), (1, want.as_str()));
    let (code, _, err) = run(Command::new(bin("kvbroker")).args(["run", "--config"]).arg(&config));
    assert_eq!(code, 1, "{err}");
    assert!(err.ends_with(&want), "{err}");
}

/// Issue 18: the first reads of a cold cache, from several pods at once, share one kubelet
/// call (single flight), and each is judged on its own pod.
#[test]
fn concurrent_first_reads_share_one_kubelet_call() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let value = canary("k8s-burst");
    let token = canary("k8s-token");
    let kubelet = Kubelet::start(&fixture("kubelet-pod.json"), &token);
    let agent = agent(&kubelet, "30s", &value);
    let mut cgs = Cgroups::default();
    let trainer = pod_cgroup(&mut cgs, "burstable", TRAINER);
    let other_ns = pod_cgroup(&mut cgs, "guaranteed", OTHER_NS);
    let statuses: Vec<u16> = std::thread::scope(|s| {
        let readers: Vec<_> = [&trainer, &other_ns, &trainer, &other_ns, &trainer, &trainer]
            .into_iter()
            .map(|dir| s.spawn(|| read_in(dir, &agent.socket, "db-password").0))
            .collect();
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    });
    assert_eq!(statuses, [200, 403, 200, 403, 200, 200]);
    assert_eq!(kubelet.calls(), 1);
    agent.assert_no_canary(&[&token], &[]);
    drop(agent);
    drop(cgs);
}
