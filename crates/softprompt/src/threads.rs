//! The thread count candle asks for. candle (0.11, `utils::get_num_threads`) asks at every matmul
//! it runs and, without RAYON_NUM_THREADS in the environment, counts the cores by reading
//! /proc/cpuinfo each time: 961 reads in a 16-token generation, a fifth of its wall time. The
//! binaries (the CLI, the Python module at import) call this once, before they start threads of
//! their own; the library itself never changes the environment.

/// Says `threads` in RAYON_NUM_THREADS, unless the environment already says a number.
pub fn tell_candle(threads: usize) {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", threads.max(1).to_string());
    }
}
