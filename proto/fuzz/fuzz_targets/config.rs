//! The config parser and validator (`Config::from_toml`) on arbitrary text: never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = kvbroker_agent::fuzz_api::config_from_toml(text);
});
