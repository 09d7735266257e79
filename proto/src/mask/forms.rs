//! The shapes a value takes when a job leaks it: as is, string-escaped (JSON as serde_json,
//! JavaScript and Python's `json.dumps` write it, Go's HTML-safe JSON, Python's `repr`, and
//! JSON inside JSON), base64 (standard and URL-safe, padded or not, and at each of the
//! three alignments it can have inside a longer base64 text, as in `Basic user:password`),
//! and URL-encoded (RFC 3986 strict, upper and lower hex; Python's `quote` keeping `/`;
//! forms' `+` for space; JavaScript's `encodeURIComponent`).
//!
//! Every buffer is [`Zeroizing`]. Forms shorter than [`super::MIN_VALUE_LEN`] are dropped.

use zeroize::Zeroizing;

type Form = Zeroizing<Vec<u8>>;

const STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const LOWER_HEX: &[u8; 16] = b"0123456789abcdef";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// Every form of `value` the masker looks for, deduplicated (the value itself first).
pub fn forms(value: &[u8]) -> Vec<Zeroizing<Vec<u8>>> {
    let mut out: Vec<Form> = vec![Zeroizing::new(value.to_vec())];
    if let Ok(text) = std::str::from_utf8(value) {
        let json = json_escape(text, Json::Minimal);
        out.push(json_escape(&String::from_utf8_lossy(&json), Json::Minimal));
        out.push(json);
        out.push(json_escape(text, Json::Ascii));
        out.push(json_escape(text, Json::HtmlSafe));
        out.push(python_repr(text));
    }
    for alphabet in [STD, URL_SAFE] {
        let full = base64(value, alphabet);
        let mut padded = Zeroizing::new(full.to_vec());
        while !padded.len().is_multiple_of(4) {
            padded.push(b'=');
        }
        out.push(padded);
        out.push(full);
        for shift in 0..3 {
            out.push(base64_inner(value, shift, alphabet));
        }
    }
    for style in [Url::Strict, Url::StrictLower, Url::KeepSlash, Url::Form, Url::Component] {
        out.push(url_encode(value, style));
    }
    out.retain(|f| f.len() >= super::MIN_VALUE_LEN);
    let mut unique: Vec<Form> = Vec::with_capacity(out.len());
    for f in out {
        if !unique.iter().any(|u| u.as_slice() == f.as_slice()) {
            unique.push(f);
        }
    }
    unique
}

#[derive(Clone, Copy, PartialEq)]
enum Json {
    /// serde_json, `JSON.stringify`: only `"`, `\` and control characters.
    Minimal,
    /// Python's `json.dumps` (ensure_ascii): also every non-ASCII character as `\uXXXX`.
    Ascii,
    /// Go's `encoding/json`: also `<`, `>`, `&`, U+2028 and U+2029.
    HtmlSafe,
}

fn json_escape(text: &str, style: Json) -> Form {
    let mut out = Zeroizing::new(Vec::with_capacity(text.len() * 2));
    let mut units = [0u16; 2];
    for c in text.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            '\u{8}' => out.extend_from_slice(b"\\b"),
            '\u{c}' => out.extend_from_slice(b"\\f"),
            c if (c as u32) < 0x20
                || (style == Json::Ascii && !c.is_ascii())
                || (style == Json::HtmlSafe && matches!(c, '<' | '>' | '&' | '\u{2028}' | '\u{2029}')) =>
            {
                for &mut u in c.encode_utf16(&mut units) {
                    out.extend_from_slice(b"\\u");
                    for shift in [12, 8, 4, 0] {
                        out.push(LOWER_HEX[usize::from((u >> shift) & 15)]);
                    }
                }
            }
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    out
}

/// The inside of Python 3's `repr(str)`: it quotes with `"` when the text has a `'` and no
/// `"`, and then does not escape the `'`.
fn python_repr(text: &str) -> Form {
    let escape_quote = !text.contains('\'') || text.contains('"');
    let mut out = Zeroizing::new(Vec::with_capacity(text.len() * 2));
    for c in text.chars() {
        match c {
            '\\' => out.extend_from_slice(b"\\\\"),
            '\'' if escape_quote => out.extend_from_slice(b"\\'"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20 || ('\u{7f}'..='\u{a0}').contains(&c) => {
                let b = c as u32 as u8;
                out.extend_from_slice(&[
                    b'\\',
                    b'x',
                    LOWER_HEX[usize::from(b >> 4)],
                    LOWER_HEX[usize::from(b & 15)],
                ]);
            }
            c => {
                let mut b = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut b).as_bytes());
            }
        }
    }
    out
}

/// Unpadded base64 of `bytes`.
fn base64(bytes: &[u8], alphabet: &[u8; 64]) -> Form {
    let mut out = Zeroizing::new(Vec::with_capacity(bytes.len().div_ceil(3) * 4));
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        let chars = chunk.len() + 1;
        for i in 0..chars {
            out.push(alphabet[((n >> (18 - 6 * i)) & 63) as usize]);
        }
    }
    out
}

/// The base64 characters that depend on `value` alone when it sits `shift` bytes past a
/// 3-byte boundary inside a longer encoded text: the characters mixed with the bytes before
/// or after it are left out.
fn base64_inner(value: &[u8], shift: usize, alphabet: &[u8; 64]) -> Form {
    let mut shifted = Zeroizing::new(vec![0u8; shift]);
    shifted.extend_from_slice(value);
    let encoded = base64(&shifted, alphabet);
    // The first characters that hold bits of the `shift` bytes before the value.
    let skip = [0, 2, 3][shift];
    // Characters whose six bits all lie within the bytes so far.
    let end = (8 * shifted.len()) / 6;
    Zeroizing::new(encoded.get(skip..end).unwrap_or_default().to_vec())
}

#[derive(Clone, Copy, PartialEq)]
enum Url {
    /// RFC 3986: everything but `A-Z a-z 0-9 - . _ ~` as `%XX`.
    Strict,
    /// The same with lower-case hex digits.
    StrictLower,
    /// Python's `urllib.parse.quote` (default `safe="/"`).
    KeepSlash,
    /// `application/x-www-form-urlencoded` (Python's `quote_plus`): space as `+`.
    Form,
    /// JavaScript's `encodeURIComponent`: also keeps `! ' ( ) *`.
    Component,
}

fn url_encode(value: &[u8], style: Url) -> Form {
    let mut out = Zeroizing::new(Vec::with_capacity(value.len() * 3));
    let hex: &[u8; 16] = if style == Url::StrictLower { LOWER_HEX } else { b"0123456789ABCDEF" };
    for &b in value {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (style == Url::KeepSlash && b == b'/')
            || (style == Url::Component && matches!(b, b'!' | b'\'' | b'(' | b')' | b'*'));
        if keep {
            out.push(b);
        } else if style == Url::Form && b == b' ' {
            out.push(b'+');
        } else {
            out.extend_from_slice(&[b'%', hex[usize::from(b >> 4)], hex[usize::from(b & 15)]]);
        }
    }
    out
}
