//! The admin socket (`[agent] admin_socket`, mode 0600, and the peer's uid must be 0):
//! [`server`] answers it inside the agent, [`client`] is `kvbroker ctl`'s side. Status shows
//! names, versions, ages and errors — never values.
//!
//! | request | does |
//! | --- | --- |
//! | `GET /v1/status` | agent, audit, policy and cache state as JSON |
//! | `POST /v1/refresh?vault=A&name=N` | refresh one secret now |
//! | `POST /v1/reload` | reload the policy (as SIGHUP does) |
//! | `GET /metrics` | Prometheus metrics ([`scrape`]; also on `[metrics] listen`) |

pub(crate) mod client;
pub(crate) mod scrape;
pub(crate) mod server;
