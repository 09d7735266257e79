//! Masker tests. Values are canaries; no assertion message prints masked or unmasked output
//! (a failing masker would put the canary in the message).

use std::sync::Arc;

use super::*;

/// The canary: punctuation that JSON, repr, base64 and URL encoding each treat differently.
const CANARY: &str = "canary-7f3a?>~~ k'é\"\n";

fn values(vs: &[&str]) -> Arc<MaskValues> {
    let v = Arc::new(MaskValues::new());
    for x in vs {
        v.learn(x.as_bytes());
    }
    v
}

/// Masks `chunks` written one after another, then end of stream.
fn mask(v: &Arc<MaskValues>, chunks: &[&[u8]]) -> Vec<u8> {
    let mut m = Masker::new(Arc::clone(v));
    let mut out = Vec::new();
    for c in chunks {
        m.push(c, &mut out);
    }
    m.finish(&mut out);
    out
}

fn same(got: &[u8], want: &[u8]) -> bool {
    got == want
}

/// Each form, computed independently with Python's standard library, is masked whole.
#[test]
fn every_encoding_is_masked() {
    let v = values(&[CANARY]);
    let encoded: &[(&str, &str)] = &[
        ("as is", CANARY),
        ("base64", "Y2FuYXJ5LTdmM2E/Pn5+IGsnw6kiCg=="),
        ("base64 unpadded", "Y2FuYXJ5LTdmM2E/Pn5+IGsnw6kiCg"),
        ("base64url", "Y2FuYXJ5LTdmM2E_Pn5-IGsnw6kiCg=="),
        ("base64url unpadded", "Y2FuYXJ5LTdmM2E_Pn5-IGsnw6kiCg"),
        ("json.dumps", r#"canary-7f3a?>~~ k'\u00e9\"\n"#),
        ("serde_json / JSON.stringify", r#"canary-7f3a?>~~ k'é\"\n"#),
        ("Go encoding/json", r#"canary-7f3a?\u003e~~ k'é\"\n"#),
        ("JSON in JSON", r#"canary-7f3a?>~~ k'é\\\"\\n"#),
        ("repr", r#"canary-7f3a?>~~ k\'é"\n"#),
        ("quote", "canary-7f3a%3F%3E~~%20k%27%C3%A9%22%0A"),
        ("quote lower-case", "canary-7f3a%3f%3e~~%20k%27%c3%a9%22%0a"),
        ("quote_plus", "canary-7f3a%3F%3E~~+k%27%C3%A9%22%0A"),
        ("encodeURIComponent", "canary-7f3a%3F%3E~~%20k'%C3%A9%22%0A"),
    ];
    for (what, form) in encoded {
        let line = format!("log: [{form}] done\n");
        let out = mask(&v, &[line.as_bytes()]);
        assert!(same(&out, b"log: [***] done\n"), "{what}: not masked whole");
    }
}

/// `Authorization: Basic base64(user:password)`: the value sits at any alignment inside a
/// longer base64 text, and the characters that only it determines are masked.
#[test]
fn base64_inside_a_longer_text_is_masked_at_every_alignment() {
    let v = values(&[CANARY]);
    for (what, text) in [
        ("u:", "dTpjYW5hcnktN2YzYT8+fn4gayfDqSIKIQ=="),
        ("us:", "dXM6Y2FuYXJ5LTdmM2E/Pn5+IGsnw6kiCiE="),
        ("use:", "dXNlOmNhbmFyeS03ZjNhPz5+fiBrJ8OpIgoh"),
    ] {
        let out = mask(&v, &[text.as_bytes()]);
        let masked = String::from_utf8(out).unwrap();
        assert!(masked.contains("***"), "{what}: not masked");
        // What is left is the few characters shared with the prefix and suffix.
        assert!(masked.len() <= 3 + 4 + 6, "{what}: {} characters left", masked.len() - 3);
    }
}

/// A value split across two writes, at every position, and across three writes at every
/// pair of positions, is masked; the text around it is intact.
#[test]
fn value_split_across_writes_is_masked_at_every_position() {
    let v = values(&[CANARY]);
    let text = format!("before {CANARY} after\n");
    let b = text.as_bytes();
    let want = b"before *** after\n";
    for i in 0..=b.len() {
        assert!(same(&mask(&v, &[&b[..i], &b[i..]]), want), "split at {i}");
        for j in i..=b.len() {
            assert!(same(&mask(&v, &[&b[..i], &b[i..j], &b[j..]]), want), "split at {i} and {j}");
        }
    }
    // Byte by byte.
    let bytes: Vec<&[u8]> = b.chunks(1).collect();
    assert!(same(&mask(&v, &bytes), want), "byte by byte");
}

/// Two values where one's end is the other's start: masked as one, no tail of either left.
#[test]
fn overlapping_values_are_masked_as_their_union() {
    let v = values(&["canary-abcdef", "defghi-canary"]);
    let text = b"x canary-abcdefghi-canary y\n";
    assert!(same(&mask(&v, &[text]), b"x *** y\n"), "in one write");
    for i in 0..=text.len() {
        assert!(same(&mask(&v, &[&text[..i], &text[i..]]), b"x *** y\n"), "split at {i}");
    }
}

/// A value that is a prefix of another: the longer one is masked whole, the shorter alone
/// too, and at end of stream the short one is not held back forever.
#[test]
fn a_value_that_is_a_prefix_of_another_is_masked_either_way() {
    let v = values(&["canary-short", "canary-short-and-long"]);
    assert!(same(&mask(&v, &[b"a canary-short-and-long b"]), b"a *** b"), "long");
    assert!(same(&mask(&v, &[b"a canary-short b"]), b"a *** b"), "short");
    assert!(same(&mask(&v, &[b"a canary-short"]), b"a ***"), "short at the end");
    assert!(same(&mask(&v, &[b"a canary-short-and", b"-long!"]), b"a ***!"), "long, split");
    assert!(same(&mask(&v, &[b"a canary-short-an", b"d more"]), b"a ***-and more"), "short, split");
}

/// Bytes that are no value pass through unchanged, in any chunking, including invalid UTF-8
/// and text that shares a prefix with a value.
#[test]
fn unrelated_bytes_are_untouched() {
    let v = values(&[CANARY, "canary-other-value"]);
    let mut text: Vec<u8> = b"epoch 1/10 loss=0.25 canary-7f3 canary-other-valu\n\xff\xfe\x00\r\n".to_vec();
    text.extend((0..=255u8).cycle().take(3000));
    for size in [1, 2, 7, 64, 4096] {
        let chunks: Vec<&[u8]> = text.chunks(size).collect();
        assert!(same(&mask(&v, &chunks), &text), "chunks of {size}");
    }
}

/// A line is emitted at once unless it ends with the first bytes of a value: no added delay
/// for ordinary output.
#[test]
fn only_a_possible_start_of_a_value_is_held_back() {
    let v = values(&[CANARY]);
    let mut m = Masker::new(Arc::clone(&v));
    let mut out = Vec::new();
    m.push(b"step 1 done\n", &mut out);
    assert!(same(&out, b"step 1 done\n") && m.held() == 0, "a line is emitted whole at once");
    out.clear();
    m.push(b"token: cana", &mut out);
    assert!(same(&out, b"token: ") && m.held() == 4, "the start of the value is held");
    out.clear();
    m.push(b"dian\n", &mut out);
    assert!(same(&out, b"canadian\n") && m.held() == 0, "released when it is no value");
}

/// The masker learns values served after the stream started (a new version after a
/// rotation), and a value learned twice changes nothing.
#[test]
fn values_learned_later_are_masked() {
    let v = values(&["canary-version-1"]);
    let mut m = Masker::new(Arc::clone(&v));
    let mut out = Vec::new();
    m.push(b"a canary-version-1 canary-", &mut out);
    assert!(v.learn(b"canary-version-2"));
    assert!(!v.learn(b"canary-version-2"), "already known");
    m.push(b"version-2 b", &mut out);
    m.finish(&mut out);
    assert!(same(&out, b"a *** *** b"), "both versions");
}

/// Values shorter than MIN_VALUE_LEN are not masked: they would shred the log.
#[test]
fn very_short_values_are_not_masked() {
    let v = values(&["v", "abc"]);
    assert!(v.snapshot().1.is_empty());
    assert!(same(&mask(&v, &[b"v abc vabc"]), b"v abc vabc"), "untouched");
}

#[test]
fn debug_shows_no_value() {
    let v = values(&[CANARY]);
    let m = Masker::new(Arc::clone(&v));
    let shown = format!("{v:?} {m:?}");
    assert!(!shown.contains("canary") && !shown.contains("Y2Fu"), "Debug shows a value");
}

#[test]
fn forms_are_unique_and_long_enough() {
    let f = forms(CANARY.as_bytes());
    for (i, a) in f.iter().enumerate() {
        assert!(a.len() >= MIN_VALUE_LEN);
        assert!(f[i + 1..].iter().all(|b| b.as_slice() != a.as_slice()), "form {i} repeated");
    }
    assert!(f.len() >= 14, "{} forms", f.len());
}
