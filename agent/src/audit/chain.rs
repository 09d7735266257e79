//! The hash chain over audit lines (docs/audit.md, "Chain").
//!
//! A line is written as `BODY` with its final `}` replaced by `,"hash":"H"}`, where `BODY`
//! is the record serialized without `hash` (it includes `prev`), and `H` is the lowercase
//! hex SHA-256 of `BODY`'s bytes. `prev` is the `hash` of the line before, or 64 zeros for
//! the first line of a chain. So a verifier needs only the bytes as written: no canonical
//! JSON, no knowledge of field order.

use sha2::{Digest, Sha256};

/// `prev` of the first record of a chain.
pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const HASH_KEY: &[u8] = b",\"hash\":\"";

/// Seals a serialized record body (no `hash`) into a full line with trailing newline.
/// Returns the line and its hash.
pub(crate) fn seal(mut body: Vec<u8>) -> (Vec<u8>, String) {
    let hash = hex::encode(Sha256::digest(&body));
    if body.last() == Some(&b'}') {
        body.pop();
    }
    body.extend_from_slice(HASH_KEY);
    body.extend_from_slice(hash.as_bytes());
    body.extend_from_slice(b"\"}\n");
    (body, hash)
}

/// Splits a written line (without newline) into the body that was hashed and the hash
/// claimed for it. `None` if the line does not end in a hash field.
pub(crate) fn unseal(line: &[u8]) -> Option<(Vec<u8>, &str)> {
    let tail_len = HASH_KEY.len() + 64 + 2;
    if line.len() < tail_len + 1 {
        return None;
    }
    let split = line.len() - tail_len;
    let (head, tail) = line.split_at(split);
    let hash = tail.strip_prefix(HASH_KEY)?.strip_suffix(b"\"}")?;
    let hash = std::str::from_utf8(hash).ok()?;
    if !hash.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()) {
        return None;
    }
    let mut body = head.to_vec();
    body.push(b'}');
    Some((body, hash))
}

/// The hash a body should carry.
pub(crate) fn hash_of(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_unseal() {
        let body = br#"{"seq":1,"prev":"00"}"#.to_vec();
        let (line, hash) = seal(body.clone());
        assert!(line.ends_with(b"\"}\n"));
        let (back, claimed) = unseal(&line[..line.len() - 1]).unwrap();
        assert_eq!(back, body);
        assert_eq!(claimed, hash);
        assert_eq!(hash_of(&back), hash);
    }

    #[test]
    fn unseal_refuses_lines_without_hash() {
        assert!(unseal(br#"{"seq":1}"#).is_none());
        let (line, _) = seal(b"{}".to_vec());
        let mut bad = line[..line.len() - 1].to_vec();
        let n = bad.len();
        bad[n - 3] = b'G';
        assert!(unseal(&bad).is_none());
    }
}
