//! `kvbroker run --config FILE`: the agent in the foreground until SIGTERM or SIGINT.

use std::path::Path;

use crate::Error;
use crate::app::{self, RunInfo};
use crate::config::Config;

pub(crate) fn run(config: &Path) -> Result<(), Error> {
    let config = Config::load(config)?;
    super::runtime()?.block_on(app::run(config, RunInfo::default()))
}
