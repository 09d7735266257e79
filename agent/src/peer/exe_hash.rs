//! SHA-256 of a caller's executable, for `exe_sha256` rules: computed only when a rule uses
//! it, from the file the process is actually running (`/proc/PID/exe`, so a replaced or
//! deleted path does not matter), and cached by (device, inode, size, mtime, ctime) so a
//! busy interpreter is hashed once — and a file patched in place is hashed again even when
//! its mtime is restored (ctime cannot be set back but by root). Files over [`MAX_HASH_BYTES`] are not hashed and match no
//! `exe_sha256` rule.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::sync::{LazyLock, Mutex};

use sha2::{Digest, Sha256};

/// Executables larger than this are not hashed.
pub(crate) const MAX_HASH_BYTES: u64 = 512 << 20;

/// (device, inode, size, mtime, ctime): ctime too, because the owner of a file can patch
/// it in place at the same size and set mtime back, but only root can set ctime back.
type FileId = (u64, u64, u64, (i64, i64), (i64, i64));

static CACHE: LazyLock<Mutex<HashMap<FileId, String>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// The hex SHA-256 of the file at `path` (typically `/proc/PID/exe`), or why not.
pub(crate) fn sha256_of(path: &str) -> Result<String, String> {
    // A device (`/dev/zero` never ends) or a FIFO (`policy explain --exe` may name one, and
    // its open would wait) is no executable to hash. The metadata is the opened file's own:
    // the identity and the bytes are the same file's.
    let (f, m) = crate::trust::open_regular(std::path::Path::new(path))
        .map_err(|e| format!("cannot hash {path}: {e}"))?;
    if m.len() > MAX_HASH_BYTES {
        return Err(format!("executable is {} bytes, over the {MAX_HASH_BYTES}-byte hashing limit", m.len()));
    }
    let id = (m.dev(), m.ino(), m.len(), (m.mtime(), m.mtime_nsec()), (m.ctime(), m.ctime_nsec()));
    let cache = || CACHE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(h) = cache().get(&id) {
        return Ok(h.clone());
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    // Never past the limit, even if the file grows while it is read (then it is not hashed:
    // a prefix's hash would be cached as the file's).
    let mut f = f.take(MAX_HASH_BYTES + 1);
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("cannot read {path}: {e}"))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    if total > MAX_HASH_BYTES {
        return Err(format!(
            "executable grew past the {MAX_HASH_BYTES}-byte hashing limit while it was read"
        ));
    }
    let hex = hex::encode(hasher.finalize());
    let mut c = cache();
    if c.len() > 4096 {
        c.clear();
    }
    c.insert(id, hex.clone());
    Ok(hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_and_caches_by_file_identity() {
        let p = std::env::temp_dir().join(format!("kvb-hash-{}", fastrand::u64(..)));
        std::fs::write(&p, b"abc").unwrap();
        let path = p.to_str().unwrap();
        let want = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(sha256_of(path).unwrap(), want);
        assert_eq!(sha256_of(path).unwrap(), want);
        // New content (size differs): a new identity, a new hash.
        std::fs::write(&p, b"abcd").unwrap();
        assert_ne!(sha256_of(path).unwrap(), want);
        std::fs::remove_file(&p).unwrap();
    }

    /// `policy explain --exe /dev/zero` (or a FIFO) with an `exe_sha256` rule hashed forever.
    #[test]
    fn only_a_regular_file_is_hashed() {
        let e = sha256_of("/dev/zero").unwrap_err();
        assert!(e.contains("not a regular file") && e.contains("give the path of a file"), "{e}");
        let fifo = std::env::temp_dir().join(format!("kvb-hash-fifo-{}", fastrand::u64(..)));
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success());
        let path = fifo.to_str().unwrap().to_owned();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(sha256_of(&path)));
        let e =
            rx.recv_timeout(std::time::Duration::from_secs(5)).expect("opening a FIFO blocked").unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_file(&fifo).unwrap();
    }
}
