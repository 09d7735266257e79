//! `[metrics]` and `[log]`: how the agent is watched. Checked at load like every section, so
//! `check-config` refuses what `run` would.

use std::net::SocketAddr;

use serde::Deserialize;

/// `[metrics]`: the Prometheus endpoint (docs/metrics.md). `GET /metrics` on the admin socket
/// is always there; `listen` adds a TCP listener that serves only `/metrics`.
#[derive(Debug, Clone, Default)]
pub struct MetricsConfig {
    /// A TCP address for `/metrics`; loopback unless `allow_remote`.
    pub listen: Option<SocketAddr>,
    /// Whether `listen` may be a non-loopback address.
    pub allow_remote: bool,
    /// Count allowed reads per secret name too (names become label values).
    pub per_secret: bool,
}

/// `[log]`: the agent's own log on stderr (never the audit log).
#[derive(Debug, Clone, Default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `warn,kvbroker_agent=debug`); `RUST_LOG` overrides it.
    pub level: Option<String>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, with the same fields.
    Json,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    listen: Option<toml::Spanned<String>>,
    allow_remote: Option<bool>,
    per_secret: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    format: Option<LogFormat>,
    level: Option<toml::Spanned<String>>,
}

/// A value refused after parsing: the byte offset of the value in the file (for its line),
/// and what to do.
pub(super) type Refused = (usize, String);

impl RawMetrics {
    pub(super) fn validate(self) -> Result<MetricsConfig, Refused> {
        let allow_remote = self.allow_remote.unwrap_or(false);
        let listen = match self.listen {
            None => None,
            Some(spanned) => {
                let at = spanned.span().start;
                let s = spanned.into_inner();
                let Ok(addr) = s.parse::<SocketAddr>() else {
                    let m = format!(
                        "[metrics] listen {s:?} is not an address: write IP:PORT, like \"127.0.0.1:9464\""
                    );
                    return Err((at, m));
                };
                if !addr.ip().is_loopback() && !allow_remote {
                    let m = format!(
                        "[metrics] listen {addr} is not a loopback address, so anyone on the network could \
                         read the metrics: use 127.0.0.1:{port} (or [::1]:{port}), or set allow_remote = true",
                        port = addr.port()
                    );
                    return Err((at, m));
                }
                Some(addr)
            }
        };
        Ok(MetricsConfig { listen, allow_remote, per_secret: self.per_secret.unwrap_or(false) })
    }
}

impl RawLog {
    pub(super) fn validate(self) -> Result<LogConfig, Refused> {
        let level = match self.level {
            None => None,
            Some(spanned) => {
                let at = spanned.span().start;
                let level = spanned.into_inner();
                if let Err(e) = tracing_subscriber::EnvFilter::try_new(&level) {
                    let m = format!(
                        "[log] level {level:?} is not a log filter ({e}): write one of error, warn, info, debug, trace"
                    );
                    return Err((at, m));
                }
                Some(level)
            }
        };
        Ok(LogConfig { format: self.format.unwrap_or_default(), level })
    }
}
