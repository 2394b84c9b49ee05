//! The mimalloc settings of the `sembed` binary, shared (by `#[path]`) with the examples that
//! measure it, so that their numbers are the ones users get.

/// Keep freed memory in the process instead of handing it back to the kernel after 10 ms: the same
/// activation sizes come back on every batch. mimalloc options by ordinal (`mi_option_e`, identical in
/// its v2 and v3 headers): 4 = arena_eager_commit, 15 = purge_delay. Call before any worker thread
/// exists.
pub fn tune() {
    // SAFETY: plain setters of mimalloc's global options.
    unsafe {
        libmimalloc_sys::mi_option_set(15, -1);
        libmimalloc_sys::mi_option_set(4, 1);
    }
}
