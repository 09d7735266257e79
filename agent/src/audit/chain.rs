//! The hash chain over audit lines (docs/audit.md, "Chain").
//!
//! A line is written as `BODY` with its final `}` replaced by `,"hash":"H"}`, where `BODY`
//! is the record serialized without `hash` (it includes `prev`), and `H` is the lowercase
//! hex SHA-256 of `BODY`'s bytes. `prev` is the `hash` of the line before, or 64 zeros for
//! the first line of a chain. So a verifier needs only the bytes as written: no canonical
//! JSON, no knowledge of field order.
//!
//! Keyed mode (`[audit] hmac_key_file`): `H` is HMAC-SHA-256 of `BODY` under the key, so
//! someone who can write the log but not read the key cannot recompute the chain.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// `prev` of the first record of a chain.
pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

const HASH_KEY: &[u8] = b",\"hash\":\"";

/// Seals the record body that ends `buf` (from `start`; no `hash`) into a full line with
/// trailing newline, in place. Returns its hash (lowercase hex).
pub(crate) fn seal_in_place(buf: &mut Vec<u8>, start: usize, key: Option<&[u8]>) -> [u8; 64] {
    let hash = digest_hex(&buf[start..], key);
    if buf.last() == Some(&b'}') {
        buf.pop();
    }
    buf.extend_from_slice(HASH_KEY);
    buf.extend_from_slice(&hash);
    buf.extend_from_slice(b"\"}\n");
    hash
}

/// [`seal_in_place`] for a body of its own (tests).
#[cfg(test)]
pub(crate) fn seal(mut body: Vec<u8>, key: Option<&[u8]>) -> (Vec<u8>, String) {
    let hash = seal_in_place(&mut body, 0, key);
    (body, String::from_utf8_lossy(&hash).into_owned())
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

/// The hash a body should carry: SHA-256, or HMAC-SHA-256 under `key`.
pub(crate) fn hash_of(body: &[u8], key: Option<&[u8]>) -> String {
    String::from_utf8_lossy(&digest_hex(body, key)).into_owned()
}

/// [`hash_of`] into a buffer of its own (the writer's path: no allocation).
pub(crate) fn digest_hex(body: &[u8], key: Option<&[u8]>) -> [u8; 64] {
    let digest: [u8; 32] = match key {
        None => Sha256::digest(body).into(),
        Some(k) => hmac_sha256(k, body),
    };
    let mut out = [0u8; 64];
    // 32 bytes always fit 64 hex digits.
    let _ = hex::encode_to_slice(digest, &mut out);
    out
}

/// HMAC-SHA-256 (RFC 2104).
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| block.map(|k| k ^ b);
    let inner = Sha256::new().chain_update(pad(0x36)).chain_update(msg).finalize();
    let out = Sha256::new().chain_update(pad(0x5c)).chain_update(inner).finalize();
    zeroize::Zeroize::zeroize(&mut block);
    out.into()
}

/// Compares hex digests in constant time (for equal lengths; a length is not secret).
pub(crate) fn same(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

/// The chain's mode as records state it (`chain` of `agent.start` and `audit.rotated`):
/// `hmac-sha256` when keyed, else `sha256`.
pub(crate) fn mode(keyed: bool) -> &'static str {
    if keyed { KEYED } else { "sha256" }
}

/// The `chain` value of a keyed log.
pub(crate) const KEYED: &str = "hmac-sha256";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_unseal() {
        let body = br#"{"seq":1,"prev":"00"}"#.to_vec();
        let (line, hash) = seal(body.clone(), None);
        assert!(line.ends_with(b"\"}\n"));
        let (back, claimed) = unseal(&line[..line.len() - 1]).unwrap();
        assert_eq!(back, body);
        assert_eq!(claimed, hash);
        assert_eq!(hash_of(&back, None), hash);
    }

    /// RFC 4231 test case 2.
    #[test]
    fn hmac_matches_rfc_4231() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(hex::encode(mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        let long_key = [0xaau8; 131];
        let mac = hmac_sha256(&long_key, b"Test Using Larger Than Block-Size Key - Hash Key First");
        assert_eq!(hex::encode(mac), "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
    }

    #[test]
    fn same_compares_whole_digests() {
        let h = hash_of(b"{}", None);
        assert!(same(&h, &h.clone()));
        let mut other = h.clone().into_bytes();
        other[63] = if other[63] == b'0' { b'1' } else { b'0' };
        assert!(!same(&h, std::str::from_utf8(&other).unwrap()));
        assert!(!same(&h, &h[..63]), "a prefix is not the same digest");
        assert!(!same(&h, ""));
    }

    #[test]
    fn unseal_refuses_lines_without_hash() {
        assert!(unseal(br#"{"seq":1}"#).is_none());
        let (line, _) = seal(b"{}".to_vec(), None);
        let mut bad = line[..line.len() - 1].to_vec();
        let n = bad.len();
        bad[n - 3] = b'G';
        assert!(unseal(&bad).is_none());
    }
}
