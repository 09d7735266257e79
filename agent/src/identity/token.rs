//! A token cache for our own credentials: one request in flight at a time, and a token is
//! renewed before it expires, so callers never race to the endpoint or use a stale token.
//! Like MSAL, a long-lived token (2 h or more) is renewed at half its life, so an endpoint
//! outage near the end of its life does not leave the agent without one; a short one five
//! minutes before expiry.

use std::time::Duration;

use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::time::OffsetDateTime;
use serde::Deserialize;

use super::endpoint::IdentityFailure;

/// Renew this long before expiry (short-lived tokens).
const RENEW_BEFORE: Duration = Duration::from_secs(300);
/// Tokens living at least this long are renewed at half-life.
const LONG_LIVED: Duration = Duration::from_secs(2 * 3600);

/// When a token obtained at `obtained` and expiring at `expires` should be renewed.
fn renew_at(obtained: OffsetDateTime, expires: OffsetDateTime) -> OffsetDateTime {
    let life = expires - obtained;
    if life >= LONG_LIVED { obtained + life / 2 } else { expires - RENEW_BEFORE }
}

/// Something that can fetch a fresh token for one resource.
#[async_trait::async_trait]
pub(super) trait Fetch: Send + Sync + std::fmt::Debug {
    async fn fetch(&self, resource: &str) -> azure_core::Result<AccessToken>;
}

/// How long a permanent refusal (an unassigned identity's 400) is answered from memory:
/// a storm of cold reads then costs the endpoint one request per interval, not one each
/// (IMDS allows 20 per second per VM).
const REMEMBER_REFUSAL: Duration = Duration::from_secs(5);

#[derive(Debug)]
pub(super) struct Cached<F> {
    fetch: F,
    /// The `[identity] source` name token requests are counted under (metrics).
    source: &'static str,
    /// The lock is held across a fetch: the single flight.
    state: tokio::sync::Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Resource → (token, renew at).
    tokens: Vec<(String, AccessToken, OffsetDateTime)>,
    /// Resource → (permanent refusal, until).
    refusals: Vec<(String, IdentityFailure, std::time::Instant)>,
}

impl<F> Cached<F> {
    pub(super) fn new(fetch: F) -> Self {
        Self { fetch, source: "unknown", state: tokio::sync::Mutex::new(State::default()) }
    }

    /// Counts this credential's token requests under `source` in the metrics.
    pub(super) fn counted_as(mut self, source: &'static str) -> Self {
        self.source = source;
        self
    }
}

#[async_trait::async_trait]
impl<F: Fetch> TokenCredential for Cached<F> {
    async fn get_token(
        &self,
        scopes: &[&str],
        _options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let resource = resource_of(scopes)?;
        let mut state = self.state.lock().await;
        let now = OffsetDateTime::now_utc();
        if let Some((_, t, _)) = state.tokens.iter().find(|(r, _, at)| *r == resource && *at > now) {
            return Ok(t.clone());
        }
        let instant = std::time::Instant::now();
        state.refusals.retain(|(_, _, until)| *until > instant);
        if let Some((_, f, _)) = state.refusals.iter().find(|(r, _, _)| *r == resource) {
            return Err(f.clone().into_error());
        }
        let fetched = self.fetch.fetch(&resource).await;
        crate::metrics::get().token(self.source, fetched.is_ok());
        let token = match fetched {
            Ok(t) => t,
            Err(e) => {
                if let Some(f) = e.downcast_ref::<IdentityFailure>().filter(|f| f.permanent) {
                    state.refusals.push((resource, f.clone(), instant + REMEMBER_REFUSAL));
                }
                return Err(e);
            }
        };
        let at = renew_at(now, token.expires_on);
        state.tokens.retain(|(r, _, _)| *r != resource);
        state.tokens.push((resource, token.clone(), at));
        Ok(token)
    }
}

/// `https://vault.azure.net/.default` → `https://vault.azure.net`.
fn resource_of(scopes: &[&str]) -> azure_core::Result<String> {
    match scopes {
        [one] => Ok(one.strip_suffix("/.default").unwrap_or(one).to_owned()),
        _ => Err(azure_core::Error::with_message(
            azure_core::error::ErrorKind::Credential,
            "managed identity tokens take exactly one scope",
        )),
    }
}

/// A token endpoint's answer. `expires_on` is a number on Azure ML and a string elsewhere.
#[derive(Deserialize)]
pub(super) struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_on: Option<serde_json::Value>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

impl TokenAnswer {
    /// Parses an answer body; the error never quotes it (it holds a token).
    pub(super) fn parse(body: &[u8], who: &str) -> azure_core::Result<AccessToken> {
        let a: TokenAnswer = serde_json::from_slice(body).map_err(|_| {
            azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                format!("{who}: token answer is not the expected JSON"),
            )
        })?;
        let secs = |v: &serde_json::Value| match v {
            serde_json::Value::Number(n) => n.as_i64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        let expires = match (a.expires_on.as_ref().and_then(secs), a.expires_in.as_ref().and_then(secs)) {
            (Some(on), _) => OffsetDateTime::from_unix_timestamp(on).ok(),
            (None, Some(within)) => {
                Some(OffsetDateTime::now_utc() + Duration::from_secs(within.max(0).unsigned_abs()))
            }
            (None, None) => None,
        };
        let expires = expires.ok_or_else(|| {
            azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                format!("{who}: token answer has no usable expires_on or expires_in"),
            )
        })?;
        Ok(AccessToken::new(a.access_token, expires))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[test]
    fn expires_on_as_number_or_string() {
        let n = TokenAnswer::parse(br#"{"access_token":"t","expires_on":4102444800}"#, "x").unwrap();
        let s = TokenAnswer::parse(br#"{"access_token":"t","expires_on":"4102444800"}"#, "x").unwrap();
        assert_eq!(n.expires_on, s.expires_on);
        let i = TokenAnswer::parse(br#"{"access_token":"t","expires_in":"3600"}"#, "x").unwrap();
        assert!(i.expires_on > OffsetDateTime::now_utc());
        let e = TokenAnswer::parse(br#"{"access_token":"secret-tok"}"#, "x").unwrap_err().to_string();
        assert!(!e.contains("secret-tok"));
        let e = TokenAnswer::parse(b"secret-tok garbage", "x").unwrap_err().to_string();
        assert!(!e.contains("secret-tok"));
    }

    #[derive(Debug, Default)]
    struct Counting(AtomicU32, i64);

    #[async_trait::async_trait]
    impl Fetch for Arc<Counting> {
        async fn fetch(&self, _resource: &str) -> azure_core::Result<AccessToken> {
            self.0.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(AccessToken::new("t", OffsetDateTime::now_utc() + Duration::from_secs(self.1.unsigned_abs())))
        }
    }

    #[tokio::test]
    async fn one_fetch_for_concurrent_callers_and_renewal_before_expiry() {
        let counter = Arc::new(Counting(AtomicU32::new(0), 3600));
        let cached = Arc::new(Cached::new(Arc::clone(&counter)));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let c = Arc::clone(&cached);
                tokio::spawn(async move {
                    c.get_token(&["https://vault.azure.net/.default"], None).await.unwrap()
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(counter.0.load(Ordering::SeqCst), 1);

        // A token inside the renewal window is fetched again.
        let short = Arc::new(Counting(AtomicU32::new(0), 60));
        let cached = Cached::new(Arc::clone(&short));
        cached.get_token(&["r/.default"], None).await.unwrap();
        cached.get_token(&["r/.default"], None).await.unwrap();
        assert_eq!(short.0.load(Ordering::SeqCst), 2);
    }

    #[derive(Debug, Default)]
    struct Refusing(AtomicU32);

    #[async_trait::async_trait]
    impl Fetch for Arc<Refusing> {
        async fn fetch(&self, _resource: &str) -> azure_core::Result<AccessToken> {
            self.0.fetch_add(1, Ordering::SeqCst);
            let url = azure_core::http::Url::parse("http://169.254.169.254/x").unwrap();
            Err(IdentityFailure::answered(
                "IMDS",
                &url,
                400,
                br#"{"error_description":"Identity not found"}"#,
            )
            .into_error())
        }
    }

    /// Issue 15: a permanent identity 400 was asked again by every cold read.
    #[tokio::test]
    async fn a_permanent_refusal_is_remembered_briefly() {
        let r = Arc::new(Refusing::default());
        let cached = Cached::new(Arc::clone(&r));
        for _ in 0..5 {
            let e = cached.get_token(&["r/.default"], None).await.unwrap_err();
            assert!(e.to_string().contains("Identity not found"), "{e}");
        }
        assert_eq!(r.0.load(Ordering::SeqCst), 1);
    }

    /// The token metric counts requests to the endpoint (not cache hits), by result; a
    /// remembered refusal is not asked again, so not counted again.
    #[tokio::test]
    async fn token_requests_are_counted_not_cache_hits() {
        let count = |source: &str, result: &str| {
            let text = crate::metrics::get().render(crate::metrics::Snapshot::default());
            let series =
                format!("kvbroker_token_acquisitions_total{{source=\"{source}\",result=\"{result}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(series.as_str()))
                .map_or(0, |v| v.parse::<u64>().unwrap())
        };
        let ok = Cached::new(Arc::new(Counting(AtomicU32::new(0), 3600))).counted_as("test-ok-source");
        for _ in 0..3 {
            ok.get_token(&["r/.default"], None).await.unwrap();
        }
        assert_eq!(count("test-ok-source", "ok"), 1);
        let refused = Cached::new(Arc::new(Refusing::default())).counted_as("test-refused-source");
        for _ in 0..3 {
            refused.get_token(&["r/.default"], None).await.unwrap_err();
        }
        assert_eq!((count("test-refused-source", "error"), count("test-refused-source", "ok")), (1, 0));
    }

    /// MSAL renews long-lived tokens at half-life; we renewed only 5 min before expiry.
    #[test]
    fn long_lived_tokens_renew_at_half_life_short_ones_five_minutes_early() {
        let t0 = OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        let h = |n: u64| Duration::from_secs(n * 3600);
        assert_eq!(renew_at(t0, t0 + h(24)), t0 + h(12));
        assert_eq!(renew_at(t0, t0 + h(2)), t0 + h(1));
        assert_eq!(renew_at(t0, t0 + h(1)), t0 + h(1) - RENEW_BEFORE);
    }
}
