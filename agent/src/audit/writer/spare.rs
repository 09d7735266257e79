//! Queued records' buffers, kept per thread once their batch is written, for the next
//! records queued on that thread: under load most records queue, and each took a new buffer
//! (issue 19). Audit lines hold no value, so a buffer needs no wiping between records.

use std::cell::RefCell;

thread_local! {
    static BUFS: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// What a new buffer holds before it grows (an allowed read's fields fit).
const FRESH: usize = 512;
/// Buffers kept per thread, at most (32 KiB at their usual size); and the largest kept.
const KEEP: usize = 64;
const KEEP_CAPACITY: usize = 4096;

/// An empty buffer: one this thread kept, or a new one.
pub(super) fn take() -> Vec<u8> {
    BUFS.with_borrow_mut(Vec::pop).unwrap_or_else(|| Vec::with_capacity(FRESH))
}

/// A written record's buffer, kept for this thread's next records (emptied; a large one is
/// let go, and so is any past [`KEEP`]).
pub(super) fn give_back(mut buf: Vec<u8>) {
    if buf.capacity() > KEEP_CAPACITY {
        return;
    }
    buf.clear();
    BUFS.with_borrow_mut(|bufs| {
        if bufs.len() < KEEP {
            bufs.push(buf);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_given_back_are_emptied_reused_and_bounded() {
        std::thread::spawn(|| {
            let mut b = take();
            b.extend_from_slice(b"{\"event\":\"secret.read\"}");
            let ptr = b.as_ptr();
            give_back(b);
            let again = take();
            assert!(again.is_empty(), "a reused buffer holds nothing of its last record");
            assert_eq!(again.as_ptr(), ptr, "the same buffer, not a new one");
            give_back(Vec::with_capacity(KEEP_CAPACITY + 1));
            assert_eq!(BUFS.with_borrow(Vec::len), 0, "a large buffer is let go");
            for _ in 0..KEEP * 2 {
                give_back(Vec::with_capacity(FRESH));
            }
            assert_eq!(BUFS.with_borrow(Vec::len), KEEP, "at most KEEP per thread");
        })
        .join()
        .unwrap();
    }
}
