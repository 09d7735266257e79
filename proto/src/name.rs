//! Validated names: secret names, version ids, vault aliases, and `VAULT/NAME` paths.
//!
//! Every constructor parses; the fields are private, so a value of these types is always
//! valid. Secret names keep the caller's spelling for display and compare by their
//! lowercase form, as Key Vault does.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a name, version or alias was refused. Holds no part of the input beyond its length,
/// so it is safe to show to any caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The secret name is empty, too long, or has a character Key Vault does not allow.
    #[error("invalid secret name: use 1 to 127 characters of 0-9, a-z, A-Z and '-'")]
    SecretName,
    /// The version id is not 32 hexadecimal characters.
    #[error("invalid secret version: a version id is 32 hexadecimal characters")]
    Version,
    /// The vault alias is empty, too long, or has a character other than `0-9a-zA-Z-_`.
    #[error("invalid vault alias: use 1 to 64 characters of 0-9, a-z, A-Z, '-' and '_'")]
    VaultAlias,
}

/// A Key Vault secret name: 1 to 127 characters of `0-9a-zA-Z-`, compared case-insensitively.
///
/// ```
/// use kvbroker_proto::SecretName;
/// let a: SecretName = "DB-Password".parse().unwrap();
/// let b: SecretName = "db-password".parse().unwrap();
/// assert_eq!(a, b);
/// assert_eq!(a.as_str(), "DB-Password");
/// assert_eq!(a.key(), "db-password");
/// assert!("db_password".parse::<SecretName>().is_err());
/// ```
#[derive(Clone)]
pub struct SecretName {
    spelled: Box<str>,
    /// The lowercase form, only when it differs from `spelled`: most names are written in
    /// lowercase, and a cache of 10,000 secrets then holds 10,000 fewer strings (issue 19).
    lower: Option<Box<str>>,
}

impl SecretName {
    /// The name as the caller (or Key Vault) spelled it.
    pub fn as_str(&self) -> &str {
        &self.spelled
    }

    /// The lowercase form used for policy matching, caching and single flight.
    pub fn key(&self) -> &str {
        self.lower.as_deref().unwrap_or(&self.spelled)
    }
}

impl std::str::FromStr for SecretName {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        let ok = (1..=127).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(NameError::SecretName);
        }
        let lower = s.bytes().any(|b| b.is_ascii_uppercase()).then(|| s.to_ascii_lowercase().into());
        Ok(Self { spelled: s.into(), lower })
    }
}

impl PartialEq for SecretName {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}
impl Eq for SecretName {}

impl std::hash::Hash for SecretName {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl fmt::Display for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spelled)
    }
}

impl fmt::Debug for SecretName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretName({:?})", self.spelled)
    }
}

/// A secret version id: 32 hexadecimal characters, kept in lowercase.
///
/// ```
/// use kvbroker_proto::VersionId;
/// let v: VersionId = "9F1C0000000000000000000000000000".parse().unwrap();
/// assert_eq!(v.as_str(), "9f1c0000000000000000000000000000");
/// assert!("9f1c".parse::<VersionId>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct VersionId(
    /// The lowercase hex digits, inline: no allocation per cached version (issue 19).
    [u8; 32],
);

impl VersionId {
    /// The id as 32 lowercase hexadecimal characters.
    pub fn as_str(&self) -> &str {
        // Every constructor stores ASCII hex digits, so this never falls back.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Builds a version id from 16 bytes (for backends that mint their own ids).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        let mut hex = [0u8; 32];
        for (i, b) in bytes.into_iter().enumerate() {
            hex[2 * i] = HEX[usize::from(b >> 4)];
            hex[2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        Self(hex)
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl std::str::FromStr for VersionId {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        let mut hex = [0u8; 32];
        if s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex.copy_from_slice(s.as_bytes());
            hex.make_ascii_lowercase();
            Ok(Self(hex))
        } else {
            Err(NameError::Version)
        }
    }
}

impl fmt::Display for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for VersionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VersionId({})", self.as_str())
    }
}

/// The local name of a configured vault (`[[vault]] alias`): 1 to 64 of `0-9a-zA-Z-_`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct VaultAlias(String);

impl VaultAlias {
    /// The alias as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for VaultAlias {
    type Err = NameError;

    fn from_str(s: &str) -> Result<Self, NameError> {
        let ok = (1..=64).contains(&s.len())
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if ok { Ok(Self(s.to_owned())) } else { Err(NameError::VaultAlias) }
    }
}

impl fmt::Display for VaultAlias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for VaultAlias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VaultAlias({})", self.0)
    }
}

/// A secret as operators write it: `VAULT/NAME`, or `NAME` for the default vault.
///
/// The one parser of that form, so every command and config key that takes a secret
/// refuses the same inputs with the same messages.
///
/// ```
/// use kvbroker_proto::SecretPath;
/// let p: SecretPath = "prod/DB-Password".parse().unwrap();
/// assert_eq!(p.vault().map(|v| v.as_str()), Some("prod"));
/// assert_eq!(p.name().as_str(), "DB-Password");
/// assert_eq!(p.to_string(), "prod/DB-Password");
/// let bare: SecretPath = "db-password".parse().unwrap();
/// assert!(bare.vault().is_none());
/// assert!("prod/db_password".parse::<SecretPath>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SecretPath {
    vault: Option<VaultAlias>,
    name: SecretName,
}

impl SecretPath {
    /// A path from parts already parsed.
    pub fn new(vault: Option<VaultAlias>, name: SecretName) -> Self {
        Self { vault, name }
    }

    /// The vault alias, if one was written.
    pub fn vault(&self) -> Option<&VaultAlias> {
        self.vault.as_ref()
    }

    /// The secret name.
    pub fn name(&self) -> &SecretName {
        &self.name
    }

    /// The alias (if written) and the name, by value.
    pub fn into_parts(self) -> (Option<VaultAlias>, SecretName) {
        (self.vault, self.name)
    }
}

impl std::str::FromStr for SecretPath {
    type Err = NameError;

    /// Splits at the first `/`: a second `/` lands in the name, which refuses it.
    fn from_str(s: &str) -> Result<Self, NameError> {
        match s.split_once('/') {
            Some((vault, name)) => Ok(Self { vault: Some(vault.parse()?), name: name.parse()? }),
            None => Ok(Self { vault: None, name: s.parse()? }),
        }
    }
}

impl fmt::Display for SecretPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.vault {
            Some(v) => write!(f, "{v}/{}", self.name),
            None => f.write_str(self.name.as_str()),
        }
    }
}

impl fmt::Debug for SecretPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretPath({self})")
    }
}

macro_rules! serde_as_str {
    ($($t:ty),*) => {$(
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    )*};
}
serde_as_str!(SecretName, VersionId, VaultAlias);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_name_bounds() {
        assert!("a".parse::<SecretName>().is_ok());
        assert!("a".repeat(127).parse::<SecretName>().is_ok());
        assert_eq!("a".repeat(128).parse::<SecretName>(), Err(NameError::SecretName));
        assert_eq!("".parse::<SecretName>(), Err(NameError::SecretName));
        for bad in ["a b", "a/b", "a_b", "ä", "a.b", "../x", "a%2f"] {
            assert!(bad.parse::<SecretName>().is_err(), "{bad}");
        }
    }

    #[test]
    fn secret_names_compare_case_insensitively() {
        let a: SecretName = "Db-Password".parse().unwrap();
        let b: SecretName = "dB-passWORD".parse().unwrap();
        assert_eq!(a, b);
        assert_eq!(a.key(), b.key());
        assert_ne!(a.as_str(), b.as_str());
    }

    #[test]
    fn version_round_trips_and_normalises() {
        let v = VersionId::from_bytes([0xab; 16]);
        assert_eq!(v.as_str().len(), 32);
        assert_eq!(v.as_str().parse::<VersionId>().unwrap(), v);
        assert!("g".repeat(32).parse::<VersionId>().is_err());
    }

    #[test]
    fn serde_validates() {
        let n: Result<SecretName, _> = serde_json::from_str("\"bad name\"");
        assert!(n.is_err());
        let n: SecretName = serde_json::from_str("\"Good-Name\"").unwrap();
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"Good-Name\"");
    }

    #[test]
    fn secret_path_round_trips() {
        for text in ["db", "Db-Password", "prod/db", "my_vault-2/DB-pw", "a/b"] {
            let p: SecretPath = text.parse().unwrap();
            assert_eq!(p.to_string(), text);
            assert_eq!(p.to_string().parse::<SecretPath>().unwrap(), p);
        }
        let p: SecretPath = "prod/Db".parse().unwrap();
        assert_eq!(p.vault(), Some(&"prod".parse().unwrap()));
        assert_eq!(p.name().as_str(), "Db");
        let bare: SecretPath = "Db".parse().unwrap();
        assert_eq!(bare.vault(), None);
        assert_eq!(bare, SecretPath::new(None, "db".parse().unwrap()), "names compare case-insensitively");
        assert_ne!(bare, p, "a written vault is part of the path");
    }

    #[test]
    fn secret_path_names_the_bad_part() {
        for bad_vault in ["/db", "pr od/db", "a.b/db", &format!("{}/db", "v".repeat(65))] {
            assert_eq!(bad_vault.parse::<SecretPath>(), Err(NameError::VaultAlias), "{bad_vault}");
        }
        for bad_name in ["", "prod/", "prod/db_pw", "prod/a/b", "db pw", "prod/../x"] {
            assert_eq!(bad_name.parse::<SecretPath>(), Err(NameError::SecretName), "{bad_name}");
        }
        let e = "prod/db_pw".parse::<SecretPath>().unwrap_err().to_string();
        assert!(e.starts_with("invalid secret name"), "{e}");
        let e = "a.b/db".parse::<SecretPath>().unwrap_err().to_string();
        assert!(e.starts_with("invalid vault alias"), "{e}");
    }

    /// From the `names` fuzz target (docs/fuzzing.md): a version written with capitals parses,
    /// and prints in lowercase, its one form (serde too), which parses to an equal version.
    #[test]
    fn version_prints_lowercase_and_round_trips() {
        let v: VersionId = "9fDc0000000000000000000000000000".parse().unwrap();
        assert_eq!(v.to_string(), "9fdc0000000000000000000000000000");
        assert_eq!(v.to_string().parse::<VersionId>().unwrap(), v);
        let json = serde_json::to_string(&v).unwrap();
        assert_eq!(json, "\"9fdc0000000000000000000000000000\"");
        assert_eq!(serde_json::from_str::<VersionId>(&json).unwrap(), v);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        const NAME_CHARS: &[char] = &['a', 'z', 'A', 'Z', '0', '9', '-', 'q', 'Q', '5'];
        const VAULT_CHARS: &[char] = &['a', 'Z', '0', '-', '_', 'k'];

        fn word(
            chars: &'static [char],
            len: std::ops::RangeInclusive<usize>,
        ) -> impl Strategy<Value = String> {
            prop::collection::vec(prop::sample::select(chars), len).prop_map(|v| v.into_iter().collect())
        }

        proptest! {
            /// Every valid name parses, prints as written, and parses back equal (also
            /// through serde); its key is its lowercase form.
            #[test]
            fn valid_names_round_trip(name in word(NAME_CHARS, 1..=127)) {
                let n: SecretName = name.parse().unwrap();
                prop_assert_eq!(n.as_str(), name.as_str());
                prop_assert_eq!(n.key(), name.to_ascii_lowercase());
                prop_assert_eq!(n.to_string().parse::<SecretName>().unwrap(), n.clone());
                let json = serde_json::to_string(&n).unwrap();
                prop_assert_eq!(serde_json::from_str::<SecretName>(&json).unwrap(), n);
            }

            /// `VAULT/NAME` and `NAME` round-trip through Display and FromStr, keeping the parts.
            #[test]
            fn paths_round_trip(vault in prop::option::of(word(VAULT_CHARS, 1..=64)),
                                name in word(NAME_CHARS, 1..=127)) {
                let text = match &vault { Some(v) => format!("{v}/{name}"), None => name.clone() };
                let p: SecretPath = text.parse().unwrap();
                prop_assert_eq!(p.to_string(), text.clone());
                prop_assert_eq!(p.vault().map(VaultAlias::as_str), vault.as_deref());
                prop_assert_eq!(p.name().as_str(), name.as_str());
                prop_assert_eq!(text.parse::<SecretPath>().unwrap(), p);
            }

            /// Any string with a character outside the alphabet, or of a wrong length, is
            /// refused, and the error says nothing of the input: it is the one fixed
            /// message whatever was refused. (Checking that the message does not contain
            /// the input failed on inputs such as `'`, which the fixed message contains.)
            #[test]
            fn invalid_names_are_refused(s in ".{0,140}") {
                let ok = (1..=127).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
                let parsed = s.parse::<SecretName>();
                prop_assert_eq!(parsed.is_ok(), ok);
                if let Err(e) = parsed {
                    prop_assert_eq!(e.to_string(), NameError::SecretName.to_string());
                }
            }

            /// Versions: any 16 bytes print as 32 lowercase hex and parse back; upper case
            /// parses to the same version.
            #[test]
            fn versions_round_trip(bytes in any::<[u8; 16]>()) {
                let v = VersionId::from_bytes(bytes);
                prop_assert_eq!(v.as_str().parse::<VersionId>().unwrap(), v.clone());
                prop_assert_eq!(v.as_str().to_ascii_uppercase().parse::<VersionId>().unwrap(), v);
            }
        }
    }
}
