//! deploy/k8s: the kustomize base and the AKS workload identity overlay render, carry what
//! docs/deploy.md promises (hostPID, read-only root, only the capabilities named, probes
//! through `kvbroker health`, the kubelet RBAC), their ConfigMap passes
//! `kvbroker check-config`, the example Job fits the base policy, and every manifest passes
//! the Kubernetes schemas (kubernetes-validate) where that tool is installed.
//!
//! Needs kubectl (its built-in kustomize) and python3 with PyYAML (YAML to JSON); `.ci/run`
//! installs both. Without kubectl the test says SKIPPED and passes.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kvbroker_tests::{TempDir, bin, run, write_mode};
use serde_json::{Value, json};

#[test]
fn base_and_workload_identity_overlay_render_with_the_promised_settings() {
    let Some(kubectl) = which("kubectl") else {
        eprintln!(
            "SKIPPED base_and_workload_identity_overlay_render_with_the_promised_settings: kubectl is not installed"
        );
        return;
    };
    let k8s = repo().join("deploy/k8s");
    let base = render(&kubectl, &k8s.join("base"));
    let kinds: Vec<&str> = base.iter().map(|o| o["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]
    );
    for o in &base {
        if !["Namespace", "ClusterRole", "ClusterRoleBinding"].contains(&o["kind"].as_str().unwrap()) {
            assert_eq!(o["metadata"]["namespace"], "kvbroker", "{}", o["kind"]);
        }
    }
    assert_eq!(one(&base, "Namespace")["metadata"]["name"], "kvbroker");
    let sa = one(&base, "ServiceAccount");
    assert_eq!(
        (&sa["metadata"]["name"], &sa["automountServiceAccountToken"]),
        (&json!("kvbroker"), &json!(true))
    );

    // RBAC: get on nodes/pods for the kubelet's /pods, nothing more (nodes/proxy is optional).
    let role = one(&base, "ClusterRole");
    assert_eq!(role["rules"], json!([{"apiGroups": [""], "resources": ["nodes/pods"], "verbs": ["get"]}]));
    let binding = one(&base, "ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    assert_eq!(
        binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "kvbroker", "namespace": "kvbroker"}])
    );

    let ds = one(&base, "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["serviceAccountName"], "kvbroker");
    assert_eq!(pod["automountServiceAccountToken"], true);
    assert_eq!(pod["containers"].as_array().unwrap().len(), 1);
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["privileged"], false);
    assert_eq!(
        sc["capabilities"],
        json!({"drop": ["ALL"], "add": ["SYS_PTRACE", "DAC_READ_SEARCH", "IPC_LOCK"]})
    );
    for r in ["requests", "limits"] {
        for k in ["cpu", "memory"] {
            assert!(c["resources"][r][k].is_string(), "resources.{r}.{k}");
        }
    }
    let node_name =
        c["env"].as_array().unwrap().iter().find(|e| e["name"] == "NODE_NAME").expect("NODE_NAME");
    assert_eq!(node_name["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName");

    // The ConfigMap the pod mounts is the generated one, and its config passes check-config.
    let cm = one(&base, "ConfigMap");
    let cm_name = cm["metadata"]["name"].as_str().unwrap();
    assert!(cm_name.starts_with("kvbroker-config-"), "{cm_name}: hash suffix");
    let config_vol = volume(pod, "/etc/kvbroker", c);
    assert_eq!(config_vol["configMap"]["name"], cm_name);
    let config = check_config(cm, "base", &[]);
    assert_eq!(config["identity"]["source"].as_str(), Some("imds"));

    // The socket the config names is on the hostPath, and both probes ask it through
    // `kvbroker health` (readiness with --ready).
    let socket = config["agent"]["socket"].as_str().unwrap();
    let socket_dir = Path::new(socket).parent().unwrap().to_str().unwrap();
    assert_eq!(volume(pod, socket_dir, c)["hostPath"]["path"], socket_dir);
    let admin = config["agent"]["admin_socket"].as_str().unwrap();
    assert!(
        !admin.starts_with(&format!("{socket_dir}/")),
        "the admin socket is not in the directory jobs mount"
    );
    let audit_dir = Path::new(config["audit"]["path"].as_str().unwrap()).parent().unwrap().to_str().unwrap();
    assert!(volume(pod, audit_dir, c)["hostPath"].is_object(), "the audit log outlives the pod");
    let probe = |which: &str| -> Vec<String> {
        serde_json::from_value(c[which]["exec"]["command"].clone()).unwrap_or_else(|_| panic!("{which}"))
    };
    assert_eq!(probe("livenessProbe"), ["kvbroker", "health", "--socket", socket, "--timeout", "3s"]);
    assert_eq!(
        probe("readinessProbe"),
        ["kvbroker", "health", "--ready", "--socket", socket, "--timeout", "3s"]
    );

    // The overlay: the SA names the identity, the pod asks the webhook, the config uses it;
    // everything else is the base's.
    let wi = render(&kubectl, &k8s.join("overlays/aks-workload-identity"));
    let wi_sa = one(&wi, "ServiceAccount");
    let client_id = wi_sa["metadata"]["annotations"]["azure.workload.identity/client-id"].as_str().unwrap();
    assert!(uuid::Uuid::parse_str(client_id).is_ok(), "{client_id}");
    let wi_ds = one(&wi, "DaemonSet");
    assert_eq!(wi_ds["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"], "true");
    assert_eq!(wi_ds["spec"]["template"]["spec"]["containers"], ds["spec"]["template"]["spec"]["containers"]);
    let wi_cm = one(&wi, "ConfigMap");
    assert_eq!(wi_cm["data"]["policy.toml"], cm["data"]["policy.toml"], "the policy is the base's");
    assert_eq!(
        volume(&wi_ds["spec"]["template"]["spec"], "/etc/kvbroker", c)["configMap"]["name"],
        wi_cm["metadata"]["name"]
    );
    // In the pod, the workload identity webhook sets these (placeholders here; check-config
    // builds the credential but asks nothing).
    let wi_config = check_config(
        wi_cm,
        "overlay",
        &[
            ("AZURE_CLIENT_ID", client_id),
            ("AZURE_TENANT_ID", "11111111-1111-1111-1111-111111111111"),
            ("AZURE_FEDERATED_TOKEN_FILE", "{token}"),
            ("AZURE_AUTHORITY_HOST", "https://login.microsoftonline.com/"),
        ],
    );
    assert_eq!(wi_config["identity"]["source"].as_str(), Some("workload-identity"));
    assert_eq!(wi_config["agent"], config["agent"]);
    for kind in ["Namespace", "ClusterRole", "ClusterRoleBinding"] {
        assert_eq!(one(&wi, kind), one(&base, kind));
    }

    // The example Job reaches the same socket, as the uid the base policy allows, for the
    // secret it allows.
    let job = yaml_to_json(&std::fs::read_to_string(k8s.join("example/read-secret-job.yaml")).unwrap());
    let job = one(&job, "Job");
    let jpod = &job["spec"]["template"]["spec"];
    let jc = &jpod["containers"][0];
    let jvol = volume(jpod, socket_dir, jc);
    assert_eq!(jvol["hostPath"]["path"], socket_dir);
    let mount = jc["volumeMounts"].as_array().unwrap().iter().find(|m| m["mountPath"] == socket_dir).unwrap();
    assert_eq!(mount["readOnly"], true);
    let env = jc["env"].as_array().unwrap().iter().find(|e| e["name"] == "KVBROKER_SOCKET").unwrap();
    assert_eq!(env["value"], socket);
    let policy: toml::Value = toml::from_str(cm["data"]["policy.toml"].as_str().unwrap()).unwrap();
    let rule = &policy["rule"][0];
    let uid = jpod["securityContext"]["runAsUser"].as_i64().unwrap();
    assert!(
        rule["uids"].as_array().unwrap().iter().any(|u| u.as_integer() == Some(uid)),
        "uid {uid} in the rule"
    );
    assert!(rule["secrets"].as_array().unwrap().iter().any(|s| s.as_str() == Some("default/db-password")));
    assert!(jc["command"].to_string().contains("kvb get db-password -o /secrets/db-password"));

    // The Kubernetes schemas, strictly (unknown fields refused).
    let Some(validate) = which("kubernetes-validate").or_else(|| {
        let venv = repo().join("target/k8s-venv/bin/kubernetes-validate");
        venv.exists().then_some(venv)
    }) else {
        eprintln!("SKIPPED schema validation: kubernetes-validate is not installed (.ci/run installs it)");
        return;
    };
    let dir = TempDir::new("k8s-validate");
    for (name, objs) in [("base.json", &base), ("overlay.json", &wi)] {
        // JSON is YAML: the validator reads one document per object.
        let docs: String = objs.iter().map(|o| format!("---\n{o}\n")).collect();
        std::fs::write(dir.path().join(name), docs).unwrap();
    }
    let (code, out, err) = run(Command::new(&validate)
        .args(["--strict", "--quiet"])
        .arg(dir.path().join("base.json"))
        .arg(dir.path().join("overlay.json"))
        .arg(k8s.join("example/read-secret-job.yaml"))
        .arg(k8s.join("optional/kubelet-nodes-proxy.yaml")));
    assert_eq!(code, 0, "kubernetes-validate:\n{out}{err}");
}

/// `kubectl kustomize DIR`, as JSON objects.
fn render(kubectl: &Path, dir: &Path) -> Vec<Value> {
    let (code, out, err) = run(Command::new(kubectl).arg("kustomize").arg(dir));
    assert_eq!(code, 0, "kubectl kustomize {}: {err}", dir.display());
    yaml_to_json(&out)
}

fn yaml_to_json(yaml: &str) -> Vec<Value> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(yaml.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "YAML to JSON (python3 with PyYAML): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn one<'a>(objs: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objs.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind}");
    found[0]
}

/// The pod's volume mounted at `path` in container `c`.
fn volume<'a>(pod: &'a Value, path: &str, c: &Value) -> &'a Value {
    let mount = c["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == path)
        .unwrap_or_else(|| panic!("nothing mounted at {path}"));
    pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).unwrap()
}

/// Writes the ConfigMap's config and policy, with their absolute paths moved into a
/// private directory, runs `kvbroker check-config` on them, and returns the config.
fn check_config(cm: &Value, tag: &str, env: &[(&str, &str)]) -> toml::Value {
    let dir = TempDir::new(&format!("k8s-config-{tag}"));
    let d = dir.path().display().to_string();
    let text = cm["data"]["config.toml"].as_str().unwrap();
    let moved = text
        .replace("\"/etc/kvbroker/", &format!("\"{d}/etc/"))
        .replace("\"/run/", &format!("\"{d}/run/"))
        .replace("\"/var/log/", &format!("\"{d}/log/"));
    assert_ne!(moved, text);
    std::fs::create_dir(dir.path().join("etc")).unwrap();
    write_mode(&dir.path().join("etc/policy.toml"), cm["data"]["policy.toml"].as_str().unwrap(), 0o644);
    let config = dir.path().join("config.toml");
    write_mode(&config, &moved, 0o644);
    // `{token}` in a variable: a stand-in for the projected service account token.
    let token = dir.path().join("token");
    std::fs::write(&token, "placeholder-token").unwrap();
    let mut cmd = Command::new(bin("kvbroker"));
    cmd.args(["check-config", "--config"]).arg(&config);
    for (k, v) in env {
        cmd.env(k, v.replace("{token}", token.to_str().unwrap()));
    }
    let (code, out, err) = run(&mut cmd);
    assert_eq!(code, 0, "check-config of the {tag} ConfigMap:\n{out}{err}");
    toml::from_str(text).unwrap()
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(tool)).find(|p| p.is_file())
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_owned()
}
