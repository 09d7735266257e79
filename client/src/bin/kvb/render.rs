//! `kvb render TEMPLATE -o FILE [--follow]`: a config file (`.pgpass`, `.netrc`, JSON, YAML)
//! with secrets filled in, re-rendered when any secret it uses rotates.
//!
//! The engine is minijinja in an empty environment: no filters, tests, globals, loaders or
//! includes; the one function is `secret("NAME", vault="A", version="ID")`. SPEC's form
//! `{{ secret "NAME" }}` (and `{{ secret "NAME" vault="A" }}`) is rewritten to that call
//! before parsing (only on one line; line numbers are unchanged).
//!
//! The engine never sees a value: `secret(…)` returns a marker holding a random per-render
//! nonce and an index, and the markers are replaced by the values afterwards, in a zeroizing
//! buffer sized before it is filled. So a value exists only in the agent's answer, in the
//! output buffer and in FILE. A value can therefore only be printed, not inspected or
//! transformed (`secret("a") == "x"` compares the marker). A missing secret or a template
//! error fails with `TEMPLATE:LINE:` and writes nothing.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use kvbroker_client::{Client, Error, GetOptions, Secret};
use minijinja::value::{Kwargs, Value};
use minijinja::{Environment, ErrorKind, UndefinedBehavior};
use zeroize::Zeroizing;

use crate::Failure;
use crate::follow::Sink;

/// How long after a rotation more rotations are awaited before re-rendering once for all.
const SETTLE: Duration = Duration::from_millis(200);

/// One `secret(…)` call: which secret, from which vault, at which version.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    name: String,
    vault: Option<String>,
    version: Option<String>,
}

impl Key {
    fn opts(&self, default_vault: Option<&str>) -> GetOptions {
        let mut o = GetOptions::default();
        if let Some(v) = self.vault.as_deref().or(default_vault) {
            o = o.vault(v);
        }
        if let Some(v) = &self.version {
            o = o.version(v);
        }
        o
    }
}

/// `kvb render`: renders once, or (`--follow`) again after each rotation until killed.
pub(crate) fn run(socket: &Path, template: &Path, vault: Option<&str>, follow: bool, sink: Sink) -> Failure {
    let source = match std::fs::read_to_string(template) {
        Ok(t) => translate(&t),
        Err(e) => return Failure::Other(format!("cannot read template {}: {e}", template.display())),
    };
    let name = template.display().to_string();
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return Failure::Other(format!("cannot start: {e}")),
    };
    rt.block_on(async {
        let client = Client::builder().socket(socket).build();
        let mut first = true;
        loop {
            let (out, used) = match render(&client, &name, &source, vault).await {
                Ok(r) => r,
                Err(f) => return f,
            };
            if let Err(f) = sink.deliver(&out, None, first).await {
                return f;
            }
            drop(out);
            if !follow {
                return Failure::Exit(0);
            }
            first = false;
            wait_for_rotation(&client, &used, vault).await;
        }
    })
}

/// Waits until any of `used` (those not pinned to a version) has a version after the one
/// rendered, then a little longer for rotations that come together.
async fn wait_for_rotation(client: &Client, used: &[(Key, String)], vault: Option<&str>) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watchers: Vec<_> = used
        .iter()
        .filter(|(k, _)| k.version.is_none())
        .map(|(k, version)| {
            let mut watch = client.watch_with(&k.name, &k.opts(vault)).after_version(version);
            let tx = tx.clone();
            tokio::spawn(async move {
                // A watch waits out a restarting agent by itself; what it returns otherwise
                // (denied, deleted) is for the next render to report, with its line.
                let _ = watch.next().await;
                let _ = tx.send(());
            })
        })
        .collect();
    drop(tx);
    if rx.recv().await.is_none() {
        // Nothing to follow (every secret pinned): nothing will ever change.
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(SETTLE).await;
    for w in watchers {
        w.abort();
    }
}

/// Renders the template: the output (wiped on drop) and each secret used with its version.
async fn render(
    client: &Client,
    name: &str,
    source: &str,
    vault: Option<&str>,
) -> Result<(Zeroizing<Vec<u8>>, Vec<(Key, String)>), Failure> {
    let nonce = nonce();
    let text = pass(name, source, &nonce, &HashMap::new())
        .map_err(|e| Failure::Other(template_failure(name, &e)))?;
    let mut secrets: Vec<(Key, Secret)> = Vec::with_capacity(text.used.len());
    let mut failed: HashMap<Key, String> = HashMap::new();
    let mut denied = false;
    for key in &text.used {
        match client.get_with(&key.name, &key.opts(vault)).await {
            Ok(s) => secrets.push((key.clone(), s)),
            Err(e) => {
                denied |= matches!(e, Error::PermissionDenied(_));
                failed.insert(key.clone(), e.to_string());
            }
        }
    }
    if !failed.is_empty() {
        // Rendered again with the failures known: the error comes with the line that asked.
        let e = match pass(name, source, &nonce, &failed) {
            Err(e) => template_failure(name, &e),
            Ok(_) => format!("{name}: a secret could not be read"),
        };
        return Err(if denied { Failure::Denied(e) } else { Failure::Other(e) });
    }
    let values: Vec<&[u8]> = secrets.iter().map(|(_, s)| s.expose_secret()).collect();
    let out = substitute(&text.text, &nonce, &values);
    Ok((out, secrets.into_iter().map(|(k, s)| (k, s.version().to_owned())).collect()))
}

/// The text of one render, with markers for values, and the secrets it asked for (in the
/// order of their marker indexes).
struct Pass {
    text: String,
    used: Vec<Key>,
}

/// One render with markers. `failed`: secrets that could not be read, made to fail where
/// they are asked for.
fn pass(
    name: &str,
    source: &str,
    nonce: &str,
    failed: &HashMap<Key, String>,
) -> Result<Pass, minijinja::Error> {
    let used: Arc<Mutex<Vec<Key>>> = Arc::default();
    let mut env = Environment::empty();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    {
        let (used, failed, nonce) = (Arc::clone(&used), failed.clone(), nonce.to_owned());
        env.add_function(
            "secret",
            move |secret: String, kwargs: Kwargs| -> Result<Value, minijinja::Error> {
                let key = Key { name: secret, vault: kwargs.get("vault")?, version: kwargs.get("version")? };
                kwargs.assert_all_used()?;
                if let Some(reason) = failed.get(&key) {
                    return Err(minijinja::Error::new(ErrorKind::InvalidOperation, reason.clone()));
                }
                let mut used = used.lock().unwrap_or_else(PoisonError::into_inner);
                let i = used.iter().position(|k| *k == key).unwrap_or_else(|| {
                    used.push(key);
                    used.len() - 1
                });
                Ok(Value::from(marker(&nonce, i)))
            },
        );
    }
    let text = env.render_named_str(name, source, ())?;
    let used = std::mem::take(&mut *used.lock().unwrap_or_else(PoisonError::into_inner));
    Ok(Pass { text, used })
}

fn template_failure(name: &str, e: &minijinja::Error) -> String {
    let line = e.line().map_or(String::new(), |l| format!("{l}:"));
    let detail = e.detail().map_or_else(|| e.kind().to_string(), str::to_owned);
    format!("{}:{line} {detail}", e.name().unwrap_or(name))
}

fn marker(nonce: &str, i: usize) -> String {
    format!("\u{1}kvb{nonce}:{i}\u{1}")
}

/// 128 random bits in hex: a template cannot contain a marker by chance.
fn nonce() -> String {
    crate::random_suffix()
}

/// `text` with each marker replaced by its value, in a buffer that is sized first and so
/// never reallocates (a reallocation would leave an unwiped copy).
fn substitute(text: &str, nonce: &str, values: &[&[u8]]) -> Zeroizing<Vec<u8>> {
    let pieces = split_markers(text, nonce, values.len());
    let len: usize = pieces.iter().map(|p| p.either(|s| s.len(), |i| values[i].len())).sum();
    let mut out = Zeroizing::new(Vec::with_capacity(len));
    for p in pieces {
        match p {
            Piece::Text(s) => out.extend_from_slice(s.as_bytes()),
            Piece::Value(i) => out.extend_from_slice(values[i]),
        }
    }
    out
}

enum Piece<'a> {
    Text(&'a str),
    Value(usize),
}

impl Piece<'_> {
    fn either(&self, text: impl Fn(&str) -> usize, value: impl Fn(usize) -> usize) -> usize {
        match self {
            Piece::Text(s) => text(s),
            Piece::Value(i) => value(*i),
        }
    }
}

fn split_markers<'a>(text: &'a str, nonce: &str, n: usize) -> Vec<Piece<'a>> {
    let open = format!("\u{1}kvb{nonce}:");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(&open) {
        let after = &rest[at + open.len()..];
        let Some(end) = after.find('\u{1}') else { break };
        match after[..end].parse::<usize>() {
            Ok(i) if i < n => {
                out.push(Piece::Text(&rest[..at]));
                out.push(Piece::Value(i));
                rest = &after[end + 1..];
            }
            _ => {
                out.push(Piece::Text(&rest[..at + open.len()]));
                rest = after;
            }
        }
    }
    out.push(Piece::Text(rest));
    out
}

/// Rewrites SPEC's `{{ secret "NAME" vault="A" }}` to `{{ secret("NAME", vault="A") }}`.
/// Only a tag on one line whose words are a quoted name and `key="value"` pairs is
/// rewritten; anything else is left for the engine, which reports it with its line.
pub(crate) fn translate(source: &str) -> String {
    let mut out = String::with_capacity(source.len() + 16);
    let mut rest = source;
    while let Some(at) = rest.find("{{") {
        out.push_str(&rest[..at]);
        let tag_start = &rest[at..];
        let Some(close) = tag_start.find("}}") else {
            out.push_str(tag_start);
            return out;
        };
        let tag = &tag_start[..close + 2];
        match rewrite_tag(tag) {
            Some(t) => out.push_str(&t),
            None => out.push_str(tag),
        }
        rest = &tag_start[close + 2..];
    }
    out.push_str(rest);
    out
}

fn rewrite_tag(tag: &str) -> Option<String> {
    if tag.contains('\n') {
        return None;
    }
    let inner = &tag[2..tag.len() - 2];
    let (lead, inner) = inner.strip_prefix('-').map_or(("", inner), |i| ("-", i));
    let (inner, trail) = inner.strip_suffix('-').map_or((inner, ""), |i| (i, "-"));
    let body = inner.trim().strip_prefix("secret")?;
    if !body.starts_with(char::is_whitespace) {
        return None;
    }
    let mut words = Vec::new();
    let mut s = body.trim_start();
    while !s.is_empty() {
        let (word, next) = take_word(s)?;
        words.push(word);
        s = next.trim_start();
    }
    let (first, kwargs) = words.split_first()?;
    if !first.starts_with('"') || kwargs.iter().any(|w| !is_kwarg(w)) {
        return None;
    }
    let args: Vec<&str> = words.iter().map(String::as_str).collect();
    Some(format!("{{{{{lead} secret({}) {trail}}}}}", args.join(", ")))
}

/// A quoted string (with `\"` escapes), or a run of non-space characters containing one.
fn take_word(s: &str) -> Option<(String, &str)> {
    let mut in_quote = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            c if c.is_whitespace() && !in_quote => return Some((s[..i].to_owned(), &s[i..])),
            _ => {}
        }
    }
    (!in_quote).then(|| (s.to_owned(), ""))
}

fn is_kwarg(w: &str) -> bool {
    matches!(w.split_once('='), Some((k, v)) if matches!(k, "vault" | "version") && v.len() >= 2 && v.starts_with('"') && v.ends_with('"'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_form_is_rewritten_to_a_call_on_the_same_line() {
        assert_eq!(translate("a {{ secret \"db\" }} b"), "a {{ secret(\"db\") }} b");
        assert_eq!(
            translate("{{- secret \"db\" vault=\"ops\" version=\"ab\" -}}"),
            "{{- secret(\"db\", vault=\"ops\", version=\"ab\") -}}"
        );
        assert_eq!(translate("{{ secret(\"db\") }}"), "{{ secret(\"db\") }}", "the call form stays");
        assert_eq!(
            translate("{{ secret \"db\" bogus=1 }}"),
            "{{ secret \"db\" bogus=1 }}",
            "left for the engine"
        );
        assert_eq!(translate("{{ x }}\n{{ secret\n\"db\" }}"), "{{ x }}\n{{ secret\n\"db\" }}");
    }

    #[test]
    fn markers_become_values_and_nothing_else_does() {
        let n = "00ff";
        let text =
            format!("u={}\np={}\nq={}{}", marker(n, 0), marker(n, 1), marker(n, 1), marker("other", 0));
        let out = substitute(&text, n, &[b"alice", b"canary-pw"]);
        assert_eq!(
            out.as_slice(),
            format!("u=alice\np=canary-pw\nq=canary-pw{}", marker("other", 0)).as_bytes()
        );
        assert_eq!(out.capacity(), out.len(), "sized once, never reallocated");
    }

    /// A template error names the template and line; the engine has no filters or globals.
    #[test]
    fn errors_name_the_line_and_the_sandbox_is_empty() {
        let e = pass("t.tmpl", "ok\n{{ secret(\"a\") | upper }}\n", "n", &HashMap::new()).err().unwrap();
        assert_eq!(e.line(), Some(2));
        assert!(pass("t.tmpl", "{{ range(3) }}", "n", &HashMap::new()).is_err(), "no globals");
        assert!(pass("t.tmpl", "{% include \"/etc/passwd\" %}", "n", &HashMap::new()).is_err(), "no loader");
        let key = Key { name: "gone".into(), vault: None, version: None };
        let failed = HashMap::from([(key, "secret gone not found".to_owned())]);
        let e = pass("t.tmpl", "a\nb\n{{ secret(\"gone\") }}", "n", &failed).err().unwrap();
        assert_eq!(template_failure("t.tmpl", &e), "t.tmpl:3: secret gone not found");
    }
}
