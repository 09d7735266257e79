//! `kvbroker rotate` against the emulator (issue 15): metadata carried forward, Key Vault's
//! refusals explained, and a credential that gave no token named as such.

use std::process::Command;

use kvbroker_tests::{EmulatorProc, bin, canary, run};
use serde_json::json;

fn rotate(emu: &EmulatorProc, source: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin("kvbroker"));
    cmd.args(["rotate", "--vault", &emu.info.vault_url]).args(args);
    cmd.args(["--identity", source, "--loopback-only", "--ca-file"]).arg(&emu.info.ca_file);
    for c in &emu.info.connect_to {
        cmd.args(["--connect-to", c]);
    }
    if let Some(id) = emu.info.identity.get(source) {
        cmd.envs(&id.env);
    }
    cmd
}

/// Key Vault starts each version bare: rotate used to drop contentType, tags and expiry.
#[test]
fn rotate_carries_content_type_tags_and_expiry_forward() {
    let emu = EmulatorProc::start(&[]);
    emu.set_secret(
        "db",
        &canary("rot-old"),
        json!({"content_type": "text/plain", "exp": 1_900_000_000, "tags": {"owner": "ml", "env": "prod"}}),
    );
    let (code, out, err) = run(&mut rotate(&emu, "azure-ml", &["db", "--generate", "32"]));
    assert_eq!((code, err.as_str()), (0, ""));
    let m = emu.secret_metadata("db");
    assert!(m["id"].as_str().unwrap().ends_with(out.trim()), "{m}");
    assert_eq!(m["contentType"], "text/plain");
    assert_eq!(m["tags"], json!({"owner": "ml", "env": "prod"}));
    assert_eq!(m["attributes"]["exp"], 1_900_000_000);

    // Flags change them: a new content type, one tag changed, no expiry.
    let (code, _, err) = run(&mut rotate(
        &emu,
        "azure-ml",
        &[
            "db",
            "--generate",
            "32",
            "--content-type",
            "application/x-token",
            "--tag",
            "env=dev",
            "--expires",
            "never",
        ],
    ));
    assert_eq!((code, err.as_str()), (0, ""));
    let m = emu.secret_metadata("db");
    assert_eq!(m["contentType"], "application/x-token");
    assert_eq!(m["tags"], json!({"owner": "ml", "env": "dev"}));
    assert!(m["attributes"].get("exp").is_none(), "{m}");
}

/// A soft-deleted name answers 409 to a new version: say so, and how to recover or purge.
#[test]
fn rotate_explains_a_soft_deleted_name() {
    let emu = EmulatorProc::start(&[("gone", "v")]);
    emu.soft_delete("gone");
    let (code, out, err) = run(&mut rotate(&emu, "azure-ml", &["gone", "--generate", "32"]));
    assert_eq!((code, out.as_str()), (1, ""));
    assert!(err.starts_with("kvbroker: Key Vault refused the new version of gone: HTTP 409 Conflict/ObjectIsDeletedButRecoverable"), "{err}");
    assert!(
        err.contains("soft-deleted secret: recover it (az keyvault secret recover) or purge it"),
        "{err}"
    );
}

/// With the default credential (the Azure CLI) and no `az`, rotate said "Key Vault refused
/// the new version" though Key Vault was never asked.
#[test]
fn rotate_names_the_credential_when_az_is_missing() {
    let emu = EmulatorProc::start(&[("s", "v")]);
    let empty = emu.dir.path().join("empty-bin");
    std::fs::create_dir(&empty).unwrap();
    let mut cmd = rotate(&emu, "azure-cli", &["s", "--generate", "32"]);
    cmd.env("PATH", &empty);
    let (code, _, err) = run(&mut cmd);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(
            "kvbroker: the Azure CLI's signed-in account could not get a token, so Key Vault was not asked:"
        ),
        "{err}"
    );
    assert!(err.contains("install the Azure CLI and run az login"), "{err}");
    assert!(!err.contains("Key Vault refused"), "{err}");
    assert_eq!(emu.count("set"), 0);
}

/// A refusal keeps Key Vault's codes; writing under RBAC needs Secrets Officer.
#[test]
fn rotate_maps_403_with_write_advice() {
    let emu = EmulatorProc::start(&[("s", "v")]);
    emu.fault(&kvbroker_tests::Fault { kind: Some("rbac".into()), ..Default::default() });
    let (code, _, err) = run(&mut rotate(&emu, "azure-ml", &["s", "--generate", "32"]));
    assert_eq!(code, 1);
    assert!(
        err.contains("HTTP 403 Forbidden/ForbiddenByRbac") && err.contains("Key Vault Secrets Officer"),
        "{err}"
    );
}
