//! `AuditRecord` JSON: parse → serialize → parse gives the same record and the same text.
#![no_main]

use kvbroker_proto::AuditRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(rec) = serde_json::from_slice::<AuditRecord>(data) else { return };
    let once = serde_json::to_string(&rec).expect("a parsed record serializes");
    let again: AuditRecord = serde_json::from_str(&once).expect("a serialized record parses");
    assert_eq!(again, rec, "record changed across a round trip: {once}");
    let twice = serde_json::to_string(&again).expect("serializes");
    assert_eq!(twice, once);
});
