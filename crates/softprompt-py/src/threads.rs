//! The workers every engine call runs on: this process's own rayon pool, never rayon's global
//! one. A fork() (multiprocessing, DataLoader workers) copies a pool's state but not its threads,
//! so a child that used its parent's pool would wait forever for workers that do not exist; here
//! a child notices the new process id and builds a pool of its own.

use pyo3::prelude::*;
use rayon::ThreadPool;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

struct Pools {
    pid: u32,
    by_size: HashMap<usize, Arc<ThreadPool>>,
}

static POOLS: Mutex<Option<Pools>> = Mutex::new(None);

/// The cores this process may use (its CPU affinity and cgroup quota included).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// This process's pool of `threads` workers.
pub fn pool(threads: usize) -> PyResult<Arc<ThreadPool>> {
    let mut pools = POOLS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let pid = std::process::id();
    if pools.as_ref().is_some_and(|p| p.pid != pid) {
        // the parent's pools: their threads are not in this process, and dropping a pool would
        // signal them; they are left as they are
        std::mem::forget(pools.take());
    }
    let pools = pools.get_or_insert_with(|| Pools {
        pid,
        by_size: HashMap::new(),
    });
    if let Some(pool) = pools.by_size.get(&threads) {
        return Ok(pool.clone());
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("softprompt-{i}"))
        .build()
        .map_err(|e| crate::invalid(format!("cannot start {threads} worker threads: {e}")))?;
    let pool = Arc::new(pool);
    pools.by_size.insert(threads, pool.clone());
    Ok(pool)
}
