//! `SecretQuery::parse` on arbitrary text: never panics, and what it accepts renders back
//! (`to_query_string`) to a string that parses to the same query.
#![no_main]

use kvbroker_proto::SecretQuery;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(q) = SecretQuery::parse(text) {
        let rendered = q.to_query_string();
        let again = SecretQuery::parse(&rendered).expect("a rendered query parses");
        assert_eq!(again, q, "query {rendered:?} does not round-trip");
    }
});
