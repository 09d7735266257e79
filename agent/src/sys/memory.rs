//! Memory: `mlock`/`madvise` for cached values, no core dumps, the zero-on-free allocator
//! and glibc malloc tuning.

use std::io;

/// Locks the pages holding `bytes` in memory and excludes them from core dumps. Pages are
/// never unlocked: a page may hold another value too, and locking is not counted.
pub(crate) fn lock_and_hide(bytes: &[u8]) -> io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
    let start = bytes.as_ptr() as usize & !(page - 1);
    let end = (bytes.as_ptr() as usize + bytes.len()).div_ceil(page) * page;
    let ptr = start as *mut libc::c_void;
    // SAFETY: [start, end) covers pages that are mapped (they hold `bytes`, which is alive);
    // mlock and madvise(MADV_DONTDUMP) change only residency and dump flags, not contents.
    let rc = unsafe { libc::mlock(ptr, end - start) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let rc = unsafe { libc::madvise(ptr, end - start, libc::MADV_DONTDUMP) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The system allocator, wiping each block when it is freed (and, through the default
/// `realloc`, the old block when one moves).
pub struct ZeroOnFree;

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; `dealloc`
// first writes zeros over exactly the block being freed, which the caller owns until then.
unsafe impl std::alloc::GlobalAlloc for ZeroOnFree {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's (valid, non-zero-size) layout.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: as `alloc`.
        unsafe { std::alloc::System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` points to a live block of `layout.size()` bytes that the caller is
        // giving up. `write_bytes` is a memset; `black_box` makes the zeroed memory count as
        // read, so the wipe is not removed as a dead store before the free.
        unsafe {
            std::ptr::write_bytes(ptr, 0, layout.size());
            std::hint::black_box(ptr);
            std::alloc::System.dealloc(ptr, layout);
        }
    }
}

/// Returns freed heap memory to the system (after startup's parsing, a large local vault's
/// text and intermediates would otherwise stay resident).
pub(crate) fn trim_heap() {
    // SAFETY: malloc_trim only releases free memory held by the allocator; no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Caps glibc malloc at two arenas. By default each thread that allocates may get its own
/// arena (up to 8 per core), and cached entries installed from different worker threads then
/// half-fill pages in several heaps: measured with 10,000 cached secrets, 2.5 MiB more RSS
/// than with two arenas (issue 19). Call before the runtime starts its threads.
pub(crate) fn limit_malloc_arenas() {
    // SAFETY: mallopt takes two integers and only changes the allocator's tuning; glibc
    // ignores a value it does not accept (it returns 0, which we need not act on).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Marks the process non-dumpable: no core dumps, and only root may ptrace it or read its
/// memory through /proc.
pub(crate) fn forbid_dumps() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_DUMPABLE, 0) takes no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
