//! Wire types shared by the kvbroker agent and its clients.
//!
//! This crate is the contract of `SPEC.md` in types: the JSON bodies of the agent socket
//! ([`api`], [`error`]), the names it accepts ([`name`]), the audit record ([`audit`]) and the
//! one type that may hold a secret value ([`SecretValue`]). It does no I/O and pulls in no
//! runtime, so every client and tool can depend on it.
//!
//! A [`SecretValue`] has no `Display`, no derived `Debug` and no `Serialize`; the only ways to
//! its bytes are [`SecretValue::expose_secret`] and the serde helpers in [`value`], which
//! name themselves at every call site.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod api;
pub mod audit;
pub mod error;
pub mod mask;
pub mod name;
pub mod value;

pub use api::{Health, SecretQuery, SecretResponse};
pub use audit::{AgentInfo, AuditRecord, CacheState, Event, Outcome, PeerInfo, SecretRef, Upstream};
pub use error::{ErrorBody, ErrorCode, ErrorDetail};
pub use name::{NameError, SecretName, SecretPath, VaultAlias, VersionId};
pub use value::SecretValue;

/// The default agent socket path, used when `KVBROKER_SOCKET` is not set.
pub const DEFAULT_SOCKET: &str = "/run/kvbroker/agent.sock";

/// The environment variable clients read for the socket path.
pub const SOCKET_ENV: &str = "KVBROKER_SOCKET";

/// The default admin socket path (`[agent] admin_socket`, and where `kvbroker ctl` looks when
/// neither its flags nor `KVBROKER_ADMIN_SOCKET` say otherwise).
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/kvbroker/admin.sock";

/// The environment variable `kvbroker ctl` reads for the admin socket path.
pub const ADMIN_SOCKET_ENV: &str = "KVBROKER_ADMIN_SOCKET";
