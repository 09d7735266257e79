//! End-to-end tests: the real `kvbroker` and `kvb` binaries (and curl), as a user runs them.
//! One binary, one module per area. Tests run as root, as CI does: they switch uid with
//! setpriv and mount a tmpfs, and clean up on drop.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]

mod attest;
mod audit_log;
mod azure_edges;
mod cache;
mod cli_errors;
mod connections;
mod doctor;
mod emulator;
mod emulator_cli;
mod first_hour;
mod k8s;
mod keyvault;
mod kubernetes;
mod launch;
mod lifecycle;
mod mask;
mod metrics;
mod policy;
mod proxy;
mod read;
mod rotate;
mod rotation;
mod systemd;
