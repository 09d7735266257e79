//! [`SecretValue`]: the one type that holds secret bytes.
//!
//! The bytes sit in a `SecretBox<[u8]>` (an exact-size heap allocation that is zeroized when
//! dropped). There is no `Display`, no `Serialize` and no `Clone`; `Debug` prints only the
//! length. Code that needs the bytes calls [`SecretValue::expose_secret`], which is easy to
//! find in review; serde code names [`serialize_exposed`] / [`deserialize_exposed`].
//!
//! The type cannot be formatted with `{}`:
//!
//! ```compile_fail
//! let v = kvbroker_proto::SecretValue::from_slice(b"hunter2");
//! let _ = format!("{}", v);
//! ```
//!
//! Nor serialized by accident:
//!
//! ```compile_fail
//! let v = kvbroker_proto::SecretValue::from_slice(b"hunter2");
//! let _ = serde_json::to_string(&v);
//! ```
//!
//! And `Debug` shows no byte of it:
//!
//! ```
//! let v = kvbroker_proto::SecretValue::from_slice(b"hunter2");
//! assert_eq!(format!("{v:?}"), "SecretValue(<redacted, 7 bytes>)");
//! ```

use std::fmt;

use secrecy::{ExposeSecret, SecretBox};
use serde::{Deserializer, Serializer};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// Secret bytes, zeroized on drop, never printed.
pub struct SecretValue(SecretBox<[u8]>);

impl SecretValue {
    /// Copies `bytes` into a new secret. The caller still owns (and should wipe) `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self(SecretBox::new(Box::from(bytes)))
    }

    /// Takes `bytes`, leaving no unwiped copy behind: a vector with spare capacity is copied
    /// into an exact-size allocation and then wiped, rather than shrunk by the allocator
    /// (which could move it and free the old block unwiped).
    pub fn from_vec(mut bytes: Vec<u8>) -> Self {
        if bytes.len() == bytes.capacity() {
            return Self(SecretBox::new(bytes.into_boxed_slice()));
        }
        let value = Self::from_slice(&bytes);
        bytes.zeroize();
        value
    }

    /// Takes a string's bytes the same way as [`SecretValue::from_vec`].
    pub fn from_string(s: String) -> Self {
        Self::from_vec(s.into_bytes())
    }

    /// The secret bytes. Every call site is a place a value leaves this type: keep them few.
    pub fn expose_secret(&self) -> &[u8] {
        self.0.expose_secret()
    }

    /// The value as UTF-8 text, if it is (Key Vault values always are).
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(self.expose_secret()).ok()
    }

    /// Length in bytes (not secret: Key Vault and the audit log treat it as metadata).
    pub fn len(&self) -> usize {
        self.expose_secret().len()
    }

    /// Whether the value is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Compares two values in constant time (for a given length).
    pub fn ct_eq(&self, other: &SecretValue) -> bool {
        self.expose_secret().ct_eq(other.expose_secret()).into()
    }
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretValue(<redacted, {} bytes>)", self.len())
    }
}

/// Serializes the value as a JSON string. The one serde path out of a [`SecretValue`]; use it
/// with `#[serde(serialize_with = "...")]` on a response field that is meant to carry it.
pub fn serialize_exposed<S: Serializer>(v: &SecretValue, s: S) -> Result<S::Ok, S::Error> {
    match v.expose_str() {
        Some(text) => s.serialize_str(text),
        None => Err(serde::ser::Error::custom(
            "secret value is not UTF-8 text: request it as application/octet-stream",
        )),
    }
}

/// Deserializes a JSON string straight into a [`SecretValue`], wiping any owned
/// intermediate string.
pub fn deserialize_exposed<'de, D: Deserializer<'de>>(d: D) -> Result<SecretValue, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = SecretValue;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a secret value string")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<SecretValue, E> {
            Ok(SecretValue::from_slice(s.as_bytes()))
        }
        fn visit_string<E: serde::de::Error>(self, s: String) -> Result<SecretValue, E> {
            Ok(SecretValue::from_string(s))
        }
    }
    d.deserialize_string(V)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let v = SecretValue::from_vec(b"canary-7f3a".to_vec());
        let shown = format!("{v:?} {v:#?}");
        assert!(!shown.contains("canary"), "{shown}");
    }

    #[test]
    fn from_vec_with_spare_capacity_keeps_bytes() {
        let mut raw = Vec::with_capacity(64);
        raw.extend_from_slice(b"abc");
        let v = SecretValue::from_vec(raw);
        assert_eq!(v.expose_secret(), b"abc");
    }

    #[test]
    fn ct_eq_compares_content() {
        let a = SecretValue::from_slice(b"abc");
        assert!(a.ct_eq(&SecretValue::from_slice(b"abc")));
        assert!(!a.ct_eq(&SecretValue::from_slice(b"abd")));
        assert!(!a.ct_eq(&SecretValue::from_slice(b"ab")));
    }

    #[test]
    fn serde_round_trip_with_escapes() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct W {
            #[serde(serialize_with = "serialize_exposed", deserialize_with = "deserialize_exposed")]
            v: SecretValue,
        }
        let w = W { v: SecretValue::from_slice("a\"b\\c\nd é".as_bytes()) };
        let json = serde_json::to_string(&w).unwrap();
        let back: W = serde_json::from_str(&json).unwrap();
        assert!(back.v.ct_eq(&w.v));
    }
}
