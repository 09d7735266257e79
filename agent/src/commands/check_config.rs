//! `kvbroker check-config --config FILE`: load the config, its vaults and its policy as
//! `run` would, and say what was found — without starting anything.

use std::path::Path;

use crate::Error;
use crate::config::Config;
use crate::policy::Policy;
use crate::vault::Vaults;

pub(crate) fn check_config(config: &Path) -> Result<(), Error> {
    let config = Config::load(config)?;
    Vaults::from_config(&config)?;
    let policy = Policy::load(&config.policy.file)?;
    println!(
        "{}: ok ({} vault(s), {} policy rule(s))",
        config.path.display(),
        config.vaults.len(),
        policy.len()
    );
    Ok(())
}
