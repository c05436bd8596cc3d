//! How the process's allocator treats the engine's tensors. The binaries (the CLI, the Python
//! module at import) call this once; the library itself never changes process-wide settings.

/// A step frees and allocates the same large tensors again and again. glibc serves each from a
/// fresh mapping and unmaps it at the free, so every step faults its tensors in anew, each page
/// zeroed by the kernel (7 % of a MiniLM step under perf). Served from the heap and never trimmed,
/// freed memory is reused as it is; what the process holds is its peak, as before.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters (glibc takes its own lock to do so).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
