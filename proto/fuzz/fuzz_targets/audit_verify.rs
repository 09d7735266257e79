//! `kvbroker audit verify` on arbitrary bytes as a log file, unkeyed and keyed (the first
//! byte picks): never panics, and an error always names a line.
#![no_main]

use libfuzzer_sys::fuzz_target;

const KEY: &[u8] = b"fuzz-key-fuzz-key-fuzz-key-fuzz!";

fuzz_target!(|data: &[u8]| {
    let (key, log) = match data.split_first() {
        Some((b'K', rest)) => (Some(KEY), rest),
        _ => (None, data),
    };
    if let Err(e) = kvbroker_agent::fuzz_api::audit_verify(log, key) {
        assert!(e.starts_with("fuzz/audit.log:"), "{e}");
    }
});
