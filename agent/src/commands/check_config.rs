//! `kvbroker check-config --config FILE`: load the config, its vaults and its policy as
//! `run` would, run every check `run` makes before serving (sockets' directories trusted,
//! `socket_group` exists, the HMAC key file's owner, mode and length), and say what was
//! found — without starting anything. Whatever `run` would refuse at start, this refuses.

use std::path::Path;

use crate::Error;
use crate::config::Config;
use crate::policy::Policy;
use crate::vault::Vaults;

pub(crate) fn check_config(config: &Path) -> Result<(), Error> {
    let config = Config::load(config)?;
    Vaults::from_config(&config)?;
    let policy = Policy::load_for(&config.policy.file, config.kubernetes.is_some())?;
    if let Some(k) = &config.kubernetes {
        crate::kube::KubeletClient::new(k, config.agent.loopback_only)?;
    }
    crate::server::check_bind(&config.agent.socket, config.agent.socket_group.as_deref())?;
    crate::server::check_bind(&config.agent.admin_socket, None)?;
    if let Some(key) = &config.audit.hmac_key_file {
        crate::audit::read_key(key)?;
    }
    println!(
        "{}: ok ({} vault(s), {} policy rule(s))",
        config.path.display(),
        config.vaults.len(),
        policy.len()
    );
    Ok(())
}
