//! An HTTP proxy for Key Vault and Entra ID: `HTTP CONNECT host:port`, then TLS end to end
//! through the tunnel (the proxy never sees the request, the token or the answer).
//!
//! Settings: `[network] proxy` first, else `HTTPS_PROXY` / `https_proxy`; `[network]
//! no_proxy` plus `NO_PROXY` / `no_proxy` exempt hosts. Only `https` targets are proxied:
//! every identity endpoint (IMDS at 169.254.169.254, App Service, Azure ML's `MSI_ENDPOINT`,
//! Arc's local agent) is plain `http` on the node, so `HTTP_PROXY` never applies to anything
//! kvbroker calls. Loopback, link-local and `localhost` are never proxied whatever the
//! settings say.
//!
//! Credentials in the proxy URL (`http://user:pass@proxy:3128`) go only into the
//! `Proxy-Authorization` header; [`Proxy::shown`] (for logs and errors) drops them.

use std::net::IpAddr;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zeroize::Zeroizing;

/// Where to send `https` connections, and which hosts go direct.
#[derive(Clone)]
pub(crate) struct Proxy {
    host: String,
    port: u16,
    /// `base64(user:pass)`, if the URL had credentials.
    auth: Option<Zeroizing<String>>,
    no_proxy: Vec<String>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("at", &self.shown())
            .field("auth", &self.auth.as_ref().map(|_| "<redacted>"))
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

/// The largest CONNECT answer head we read.
const MAX_HEAD: usize = 8 * 1024;

impl Proxy {
    /// From the config (`configured`, `configured_no_proxy`) and the environment (`env`),
    /// config first. `None`: no proxy. An unusable URL is an error naming where it came from.
    pub(crate) fn from_settings(
        configured: Option<&str>,
        configured_no_proxy: &[String],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, String> {
        let nonempty = |k: &str| env(k).filter(|v| !v.trim().is_empty());
        let (url, from) = match configured {
            Some(u) => (u.to_owned(), "[network] proxy"),
            None => match nonempty("HTTPS_PROXY")
                .map(|v| (v, "HTTPS_PROXY"))
                .or_else(|| nonempty("https_proxy").map(|v| (v, "https_proxy")))
            {
                Some(found) => found,
                None => return Ok(None),
            },
        };
        let mut no_proxy: Vec<String> =
            configured_no_proxy.iter().map(|s| s.trim().to_ascii_lowercase()).collect();
        if let Some(np) = nonempty("NO_PROXY").or_else(|| nonempty("no_proxy")) {
            no_proxy.extend(np.split(',').map(|s| s.trim().to_ascii_lowercase()).filter(|s| !s.is_empty()));
        }
        Self::parse(&url, no_proxy).map(Some).map_err(|why| format!("{from}: {why}"))
    }

    fn parse(url: &str, no_proxy: Vec<String>) -> Result<Self, String> {
        let with_scheme = if url.contains("://") { url.to_owned() } else { format!("http://{url}") };
        let u = azure_core::http::Url::parse(&with_scheme)
            .map_err(|e| format!("not a proxy URL ({e}); write http://[user:pass@]host:port"))?;
        if u.scheme() != "http" {
            return Err(format!(
                "proxy scheme {} is not supported; write http://[user:pass@]host:port (the tunnel to Key Vault is TLS either way)",
                u.scheme()
            ));
        }
        let host = u.host_str().ok_or("the proxy URL has no host")?.trim_matches(['[', ']']).to_owned();
        let port = u.port().unwrap_or(80);
        let auth = if u.username().is_empty() {
            None
        } else {
            let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
            let pair =
                Zeroizing::new(format!("{}:{}", decode(u.username()), decode(u.password().unwrap_or(""))));
            Some(Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())))
        };
        Ok(Self { host, port, auth, no_proxy })
    }

    /// `http://host:port`, never the credentials.
    pub(crate) fn shown(&self) -> String {
        if self.host.contains(':') {
            format!("http://[{}]:{}", self.host, self.port)
        } else {
            format!("http://{}:{}", self.host, self.port)
        }
    }

    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    pub(crate) fn port(&self) -> u16 {
        self.port
    }

    /// Whether a connection to `https://host:port` goes through the proxy.
    pub(crate) fn applies(&self, host: &str, port: u16) -> bool {
        let host = host.trim_matches(['[', ']']).to_ascii_lowercase();
        if host == "localhost" || host.ends_with(".localhost") {
            return false;
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            let local = match ip {
                IpAddr::V4(v4) => v4.is_loopback() || v4.is_link_local(),
                IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xffc0) == 0xfe80,
            };
            if local {
                return false;
            }
        }
        !self.no_proxy.iter().any(|entry| no_proxy_matches(entry, &host, port))
    }

    /// Opens the tunnel on `stream` (already connected to the proxy). Errors never carry the
    /// credentials; `(message, permanent)`: a refusal (407, 403) will not change on retry.
    pub(crate) async fn connect<S>(&self, stream: &mut S, host: &str, port: u16) -> Result<(), (String, bool)>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let authority = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut head = Zeroizing::new(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"));
        if let Some(a) = &self.auth {
            head.push_str("Proxy-Authorization: Basic ");
            head.push_str(a);
            head.push_str("\r\n");
        }
        head.push_str("\r\n");
        let shown = self.shown();
        stream
            .write_all(head.as_bytes())
            .await
            .map_err(|e| (format!("proxy {shown}: sending CONNECT failed: {e}"), false))?;
        // Byte by byte up to the blank line: TLS bytes follow at once and must stay unread.
        let mut answer = Vec::with_capacity(256);
        while !answer.ends_with(b"\r\n\r\n") {
            if answer.len() >= MAX_HEAD {
                return Err((format!("proxy {shown}: CONNECT answer head larger than 8 KiB"), false));
            }
            let b = stream.read_u8().await.map_err(|e| {
                (format!("proxy {shown} closed the connection during CONNECT {authority}: {e}"), false)
            })?;
            answer.push(b);
        }
        let status_line = String::from_utf8_lossy(answer.split(|b| *b == b'\n').next().unwrap_or_default());
        let status = status_line.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok());
        match status {
            Some(200..=299) => Ok(()),
            Some(407) => Err((
                format!(
                    "proxy {shown} wants authentication for CONNECT {authority} (HTTP 407): put user:password in the proxy URL ({})",
                    if self.auth.is_some() { "the ones given were refused" } else { "none were given" }
                ),
                true,
            )),
            Some(s) => Err((
                format!(
                    "proxy {shown} refused CONNECT {authority} (HTTP {s}): allow the host in the proxy, or add it to NO_PROXY if it is reachable directly"
                ),
                (400..500).contains(&s),
            )),
            None => Err((format!("proxy {shown} sent no HTTP status for CONNECT {authority}"), false)),
        }
    }
}

/// curl's NO_PROXY rules: `*` matches all; `host`, `.domain` or `domain` match the host and
/// its subdomains; an entry with `:port` matches that port only; an IP matches itself; a
/// CIDR block (`10.0.0.0/8`, `fd00::/8`) matches an IP host inside it. As in curl and Go, a
/// host name is matched as written, never by the address it resolves to.
fn no_proxy_matches(entry: &str, host: &str, port: u16) -> bool {
    if entry == "*" {
        return true;
    }
    if let Some((net, bits)) = entry.split_once('/') {
        let net = net.trim_matches(['[', ']']);
        return match (net.parse::<IpAddr>(), bits.parse::<u8>(), host.parse::<IpAddr>()) {
            (Ok(net), Ok(bits), Ok(ip)) => in_block(ip, net, bits),
            _ => false,
        };
    }
    if let (Ok(a), Ok(b)) = (entry.trim_matches(['[', ']']).parse::<IpAddr>(), host.parse::<IpAddr>()) {
        return a == b;
    }
    let (name, want_port) = match entry.rsplit_once(':') {
        Some((n, p)) if !n.contains(':') => match p.parse::<u16>() {
            Ok(p) => (n, Some(p)),
            Err(_) => (entry, None),
        },
        _ => (entry, None),
    };
    if want_port.is_some_and(|p| p != port) {
        return false;
    }
    let name = name.trim_start_matches("*.").trim_start_matches('.');
    !name.is_empty() && (host == name || host.ends_with(&format!(".{name}")))
}

/// Whether `ip` lies in `net/bits` (an IPv4-mapped IPv6 host is compared as IPv4). A prefix
/// longer than the address is no block at all.
fn in_block(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) if bits <= 32 => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) if bits <= 128 => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    }

    #[test]
    fn config_wins_over_the_environment_and_credentials_never_show() {
        let p = Proxy::from_settings(
            Some("http://alice:s%40cret@proxy.corp:3128"),
            &[],
            &env(&[("HTTPS_PROXY", "http://other:1")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.shown(), "http://proxy.corp:3128");
        let dbg = format!("{p:?}");
        assert!(!dbg.contains("s@cret") && !dbg.contains("s%40cret") && !dbg.contains("alice"), "{dbg}");
        let expect = base64::engine::general_purpose::STANDARD.encode("alice:s@cret");
        assert_eq!(p.auth.as_deref().map(String::as_str), Some(expect.as_str()));
        let e = Proxy::from_settings(None, &[], &env(&[("https_proxy", "socks5://x:1")])).unwrap_err();
        assert!(e.starts_with("https_proxy: proxy scheme socks5 is not supported"), "{e}");
        assert!(Proxy::from_settings(None, &[], &env(&[("HTTP_PROXY", "http://p:1")])).unwrap().is_none());
    }

    #[test]
    fn identity_endpoints_loopback_and_no_proxy_go_direct() {
        let p = Proxy::from_settings(
            None,
            &["internal.example".into()],
            &env(&[("HTTPS_PROXY", "p:3128"), ("NO_PROXY", ".privatelink.vaultcore.azure.net, other:8443")]),
        )
        .unwrap()
        .unwrap();
        assert_eq!((p.host(), p.port()), ("p", 3128));
        assert!(p.applies("myvault.vault.azure.net", 443));
        assert!(p.applies("login.microsoftonline.com", 443));
        for (h, port) in [
            ("169.254.169.254", 80),
            ("127.0.0.1", 443),
            ("[::1]", 443),
            ("localhost", 40342),
            ("x.privatelink.vaultcore.azure.net", 443),
            ("privatelink.vaultcore.azure.net", 443),
            ("a.internal.example", 443),
            ("other", 8443),
        ] {
            assert!(!p.applies(h, port), "{h}:{port}");
        }
        assert!(p.applies("other", 443), "NO_PROXY entry with a port matches that port only");
        assert!(p.applies("notprivatelink.vaultcore.azure.net", 443), "suffix matches on a label boundary");
    }

    /// Issue 15: NO_PROXY had no CIDR entries; private endpoints are often given as blocks.
    #[test]
    fn no_proxy_cidr_blocks_match_ip_hosts_inside_them() {
        let p = Proxy::from_settings(
            None,
            &[],
            &env(&[
                ("HTTPS_PROXY", "p:3128"),
                ("NO_PROXY", "10.0.0.0/8, 192.168.4.0/22,fd00::/8,172.16.0.1"),
            ]),
        )
        .unwrap()
        .unwrap();
        for h in ["10.1.2.3", "10.255.255.255", "192.168.7.1", "[fd12::1]", "172.16.0.1", "::ffff:10.0.0.1"] {
            assert!(!p.applies(h, 443), "{h} is inside a NO_PROXY block");
        }
        for h in
            ["11.0.0.1", "192.168.8.1", "[fe00::1]", "172.16.0.2", "myvault.vault.azure.net", "10.example"]
        {
            assert!(p.applies(h, 443), "{h} is outside every NO_PROXY block");
        }
        assert!(in_block("1.2.3.4".parse().unwrap(), "0.0.0.0".parse().unwrap(), 0));
        assert!(!in_block("1.2.3.4".parse().unwrap(), "1.2.3.4".parse().unwrap(), 33));
        assert!(!in_block("10.0.0.1".parse().unwrap(), "::".parse().unwrap(), 0), "families differ");
    }
}
