//! Secret names, versions, vault aliases and `VAULT/NAME` paths: parsing never panics, and
//! each accepted value prints back to its input (exactly; a version in lowercase, its one
//! canonical form) and parses to an equal value; serde agrees with `FromStr`.
#![no_main]

use std::fmt::Display;
use std::str::FromStr;

use kvbroker_proto::{SecretName, SecretPath, VaultAlias, VersionId};
use libfuzzer_sys::fuzz_target;

/// Prints back to its input (`exact`, or up to ASCII case) and parses to an equal value.
fn round_trip<T: FromStr + Display + PartialEq + std::fmt::Debug>(text: &str, exact: bool) -> Option<T> {
    let v = text.parse::<T>().ok()?;
    let shown = v.to_string();
    if exact {
        assert_eq!(shown, text, "prints differently from its input");
    } else {
        assert_eq!(shown, text.to_ascii_lowercase(), "prints other than its lowercase input");
    }
    let again: T = shown.parse().ok().expect("what prints parses");
    assert_eq!(again, v);
    Some(v)
}

/// [`round_trip`], and serde agrees with `FromStr` both ways.
fn round_trip_serde<T>(text: &str, exact: bool)
where
    T: FromStr + Display + PartialEq + std::fmt::Debug + serde::Serialize + serde::de::DeserializeOwned,
{
    let Some(v) = round_trip::<T>(text, exact) else {
        // serde refuses what FromStr refuses.
        let json = serde_json::to_string(text).expect("a str serializes");
        assert!(serde_json::from_str::<T>(&json).is_err(), "serde accepts {text:?}, FromStr does not");
        return;
    };
    let json = serde_json::to_string(&v).expect("serializes");
    let back: T = serde_json::from_str(&json).expect("deserializes what it serialized");
    assert_eq!(back, v);
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    round_trip_serde::<SecretName>(text, true);
    round_trip_serde::<VersionId>(text, false);
    round_trip_serde::<VaultAlias>(text, true);
    if let Some(p) = round_trip::<SecretPath>(text, true) {
        let (vault, name) = p.clone().into_parts();
        assert_eq!(SecretPath::new(vault, name), p);
    }
});
