//! A blocking client, for programs without an async runtime. It runs its own
//! single-threaded runtime; do not call it from inside another runtime.

use std::path::{Path, PathBuf};

use crate::{Error, GetOptions, Secret};

/// A blocking client of one agent socket.
pub struct Client {
    rt: tokio::runtime::Runtime,
    inner: crate::Client,
}

impl Client {
    /// A client of `KVBROKER_SOCKET`, else `/run/kvbroker/agent.sock`.
    pub fn new() -> Result<Client, Error> {
        Self::with_socket(crate::default_socket())
    }

    /// A client of the socket at `path`.
    pub fn with_socket(path: impl Into<PathBuf>) -> Result<Client, Error> {
        let path = path.into();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| Error::Unreachable { path: path.clone(), source })?;
        Ok(Client { rt, inner: crate::Client::builder().socket(path).build() })
    }

    /// The socket this client talks to.
    pub fn socket_path(&self) -> &Path {
        self.inner.socket_path()
    }

    /// Reads the current version of `name` from the default vault.
    pub fn get(&self, name: &str) -> Result<Secret, Error> {
        self.rt.block_on(self.inner.get(name))
    }

    /// Follows `name`'s versions: calls `on_version` with the current version id, then with
    /// each new one as it is cached, until `on_version` returns false or an error occurs.
    pub fn watch(
        &self,
        name: &str,
        opts: &GetOptions,
        mut on_version: impl FnMut(&str) -> bool,
    ) -> Result<(), Error> {
        let mut watch = self.inner.watch_with(name, opts);
        loop {
            let secret = self.rt.block_on(watch.next())?;
            if !on_version(secret.version()) {
                return Ok(());
            }
        }
    }

    /// Reads `name` with the given vault and version.
    pub fn get_with(&self, name: &str, opts: &GetOptions) -> Result<Secret, Error> {
        self.rt.block_on(self.inner.get_with(name, opts))
    }
}
