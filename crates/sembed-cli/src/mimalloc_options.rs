//! The mimalloc settings of the `sembed` binary, shared (by `#[path]`) with the examples that
//! measure it, so that their numbers are the ones users get.

/// Keep freed memory in the process for a while instead of handing it back to the kernel after
/// 10 ms: the same activation sizes come back on every batch. mimalloc options by ordinal
/// (`mi_option_e`, identical in its v2 and v3 headers): 4 = arena_eager_commit, 15 = purge_delay
/// (ms; arenas wait 10× longer). Not -1 (never): then nothing is ever scheduled for purging and the
/// server's idle release (`fast::release_scratch`, which forces a purge) could not shrink the
/// process. Call before any worker thread exists.
pub fn tune() {
    // SAFETY: plain setters of mimalloc's global options.
    unsafe {
        libmimalloc_sys::mi_option_set(15, 1000);
        libmimalloc_sys::mi_option_set(4, 1);
    }
}

/// For training (`sembed train`, `sembed tune`): never hand freed memory back while the process
/// runs. Every step frees and re-allocates the same activations; with purging, each step faulted
/// them in again, and the kernel's zeroing of those fresh pages took 13% of a MiniLM step. A
/// training run's RSS stays at its peak step either way. Call before any worker thread exists.
#[allow(dead_code)]
pub fn tune_training() {
    // SAFETY: a plain setter of mimalloc's global options (15 = purge_delay; -1 = never).
    unsafe {
        libmimalloc_sys::mi_option_set(15, -1);
    }
}
