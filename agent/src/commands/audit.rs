//! `kvbroker audit verify | query | tail`: read audit logs (never the agent's memory).

use std::io::Write;

use crate::Error;
use crate::audit::{self, query, verify};
use crate::cli::AuditCommand;

pub(crate) fn command(command: AuditCommand) -> Result<(), Error> {
    match command {
        AuditCommand::Query { files, secret, uid, outcome, since, json, summary } => {
            let filter = query::Filter { secret, uid, outcome, since };
            print!("{}", query::query(&files, &filter, json, summary)?);
        }
        AuditCommand::Tail { file, lines, json } => {
            query::tail(&file, lines, json, |s| {
                let mut out = std::io::stdout().lock();
                out.write_all(s.as_bytes()).and_then(|()| out.flush()).is_ok()
            })?;
        }
        AuditCommand::Verify { files, key_file } => {
            let key = key_file.as_deref().map(audit::read_key).transpose()?;
            let v = verify::verify(&files, key.as_ref().map(|k| k.as_slice()))?;
            println!(
                "ok: {} record(s) in {} file(s), seq {}..{}, head {}",
                v.records, v.files, v.first_seq, v.last_seq, v.head
            );
        }
    }
    Ok(())
}
