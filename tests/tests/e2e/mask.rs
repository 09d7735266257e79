//! Job output masking (issue 14, item 3): `kvb exec` and `kvbroker launch` turn every value
//! they served, and its common encodings, into `***` in the job's stdout and stderr, and keep
//! the exit status; `--no-mask` passes values through (and launch audits that).
//!
//! No assertion prints captured output: a masking bug would put the canary in the message.

use kvbroker_tests::{Agent, canary, kvb, run};

use super::launch::Job;

/// The canary with characters JSON, base64 and URL encoding each treat differently.
fn special_canary(tag: &str) -> String {
    format!("{}-\"q/+é~", canary(tag))
}

/// What a careless job prints, with `$P` holding the value: as is, base64'd, inside JSON,
/// split across two writes 300 ms apart, to stderr, and a line that only looks like a value.
const PRINTS: &str = r#"
echo "plain: $P"
echo "b64: $(printf '%s' "$P" | base64 -w0)"
python3 -c 'import json, os; print("json:", json.dumps({"pw": os.environ["P"]}), flush=True)'
python3 -c 'import os, urllib.parse; print("url: x?pw=" + urllib.parse.quote_plus(os.environ["P"]), flush=True)'
half=${P%????????????}
printf 'split: %s' "$half"; sleep 0.3; printf '%s\n' "${P#"$half"}"
echo "unrelated: epoch 1/3 loss=0.25 CANARY-not-a-value"
echo "err: $P" >&2
exit 7
"#;

const MASKED_STDOUT: &str = "plain: ***\nb64: ***\njson: {\"pw\": \"***\"}\nurl: x?pw=***\nsplit: ***\n\
                             unrelated: epoch 1/3 loss=0.25 CANARY-not-a-value\n";

fn assert_no_value(value: &str, texts: &[(&str, &str)]) {
    for (what, text) in texts {
        assert!(!text.contains(value), "the value reached {what}");
        // The value's distinctive part, in case an encoding left it recognisable.
        let core = &value[7..value.find('"').unwrap()];
        assert!(!text.contains(core), "part of the value reached {what}");
    }
}

/// `print(secret)` under `kvb exec` reaches the log as `***`, in every shape the job
/// prints it, even split across writes; other text is untouched; the exit status is the
/// command's.
#[test]
fn kvb_exec_masks_values_in_the_commands_output() {
    let value = special_canary("mask-exec");
    let agent = Agent::builder("mask-exec").secret("db-password", &value).allow_uid(0).start();
    let (code, out, err) =
        run(kvb(&agent.socket, None).args(["exec", "--env", "P=db-password", "--", "sh", "-c", PRINTS]));
    assert_eq!(code, 7, "the command's exit status");
    assert!(out == MASKED_STDOUT, "stdout is not the masked text");
    assert!(err == "err: ***\n", "stderr is not the masked text");
    assert_no_value(&value, &[("stdout", &out), ("stderr", &err)]);
    agent.assert_no_canary(&[&value], &[]);
}

/// `--no-mask` restores the old behaviour: kvb becomes the command and its output is as
/// printed.
#[test]
fn kvb_exec_no_mask_passes_values_through() {
    let value = special_canary("mask-exec-off");
    let agent = Agent::builder("mask-exec-off").secret("db-password", &value).allow_uid(0).start();
    let (code, out, err) = run(kvb(&agent.socket, None).args([
        "exec",
        "--no-mask",
        "--env",
        "P=db-password",
        "--",
        "sh",
        "-c",
        PRINTS,
    ]));
    assert_eq!(code, 7);
    assert!(out.contains(&format!("plain: {value}\n")), "the value is printed as is");
    assert!(err == format!("err: {value}\n"), "stderr is as printed");
    assert!(!out.contains("***"), "nothing masked");
}

/// Under `kvbroker launch`, a value the job read from the socket is masked in its output;
/// `agent.start` says masking is on; the exit status is the command's.
#[test]
fn launch_masks_values_served_to_the_job() {
    let value = special_canary("mask-launch");
    let job = Job::new("mask-launch", &[("db-password", &value)]);
    let script = format!("set -e\nexport P=\"$(kvb get db-password)\"\n{PRINTS}");
    let (code, out, err) = run(&mut job.command(&[], &script));
    assert_eq!(code, 7, "the command's exit status");
    assert!(out == MASKED_STDOUT, "stdout is not the masked text");
    assert!(err.contains("err: ***\n"), "stderr is not masked");
    assert_no_value(&value, &[("stdout", &out), ("stderr", &err)]);
    let records = job.records();
    assert_eq!(records[0]["event"], "agent.start");
    assert_eq!(records[0]["agent"]["output_masking"], true);
    let audit = std::fs::read_to_string(job.audit()).unwrap();
    assert_no_value(&value, &[("the audit log", &audit)]);
}

/// `kvbroker launch --no-mask`: values pass through, and the audit log says masking was off.
#[test]
fn launch_no_mask_passes_values_through_and_is_audited() {
    let value = special_canary("mask-launch-off");
    let job = Job::new("mask-launch-off", &[("db-password", &value)]);
    let script = format!("set -e\nexport P=\"$(kvb get db-password)\"\n{PRINTS}");
    let (code, out, err) = run(&mut job.command(&["--no-mask"], &script));
    assert_eq!(code, 7);
    assert!(out.contains(&format!("plain: {value}\n")), "the value is printed as is");
    assert!(err.contains(&format!("err: {value}\n")), "stderr is as printed");
    let start = &job.records()[0];
    assert_eq!(start["event"], "agent.start");
    assert_eq!(start["agent"]["output_masking"], false);
    assert!(start["reason"].as_str().unwrap().contains("--no-mask"), "reason names --no-mask");
    let audit = std::fs::read_to_string(job.audit()).unwrap();
    assert_no_value(&value, &[("the audit log", &audit)]);
}

/// A version rotated while the command runs, which the command reads for itself from the
/// socket, is masked too: `kvb exec` follows the secrets it handed over.
#[test]
fn kvb_exec_masks_a_version_rotated_while_the_command_runs() {
    use kvbroker_tests::EmulatorProc;
    use serde_json::json;
    let (old, new) = (canary("mask-rot-old"), canary("mask-rot-new"));
    let emu = EmulatorProc::start(&[("db-password", &old)]);
    let agent = Agent::builder("mask-rotate")
        .keyvault(&emu, "azure-ml")
        .allow_uid(0)
        .cache("refresh_interval = \"1s\"\nversion_grace = \"1h\"")
        .start();
    let kvb_bin = kvbroker_tests::bin("kvb");
    // The job waits for the rotation, reads the new value itself, and prints it.
    let script = format!(
        "for i in $(seq 1 100); do v=\"$({kvb} get db-password)\"; [ \"$v\" != \"$P\" ] && break; sleep 0.1; done\n\
         sleep 0.5\necho \"new: $v\"\necho \"old: $P\"\n",
        kvb = kvb_bin.display()
    );
    let mut cmd = kvb(&agent.socket, None);
    cmd.args(["exec", "--env", "P=db-password", "--", "sh", "-c", &script]);
    cmd.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let child = cmd.spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    emu.set_secret("db-password", &new, json!({}));
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout == "new: ***\nold: ***\n", "stdout is not the masked text");
    assert!(!stdout.contains(&new) && !stderr.contains(&new), "the rotated value reached the output");
    agent.assert_no_canary(&[&old, &new], &[]);
}
