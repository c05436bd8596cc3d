//! Which processes `softprompt train` runs among: the ranks of an MPI job when `mpirun` or
//! Slurm's `srun` started this one (a build with the `mpi` feature), else this process alone; and
//! how many threads each rank's kernels take.

use softprompt::collective::{Collective, SingleProcess};

/// The job's size as launchers tell the processes they start (Open MPI, MPICH's Hydra and
/// Slurm's `srun`), when one started this process.
fn launched_size() -> Option<usize> {
    let size = |name: &str| std::env::var(name).ok()?.parse::<usize>().ok();
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"]
        .into_iter()
        .find_map(size)
}

/// How many of the job's ranks share this machine, as the launcher says.
fn local_size() -> Option<usize> {
    let size = |name: &str| std::env::var(name).ok()?.parse::<usize>().ok();
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"]
        .into_iter()
        .find_map(size)
}

/// `text` on stderr in one write: a job's ranks share the launcher's stderr, and `eprintln!`
/// writes a line in pieces, which another rank's line can split (a pipe keeps a write of up to
/// 4 KiB whole).
pub fn say(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

/// The ranks of the job this process belongs to.
pub fn join() -> anyhow::Result<Box<dyn Collective>> {
    match launched_size() {
        Some(n) if n > 1 => mpi_world(n),
        _ => Ok(Box::new(SingleProcess)),
    }
}

#[cfg(feature = "mpi")]
fn mpi_world(_: usize) -> anyhow::Result<Box<dyn Collective>> {
    let world = softprompt::collective::mpi::Mpi::initialize()?;
    // one line from each rank: who joined, where, with how many threads
    say(&format!(
        "rank {} of {} on {}: threads {}\n",
        world.rank(),
        world.size(),
        world.host(),
        rayon::current_num_threads()
    ));
    Ok(Box::new(world))
}

#[cfg(not(feature = "mpi"))]
fn mpi_world(n: usize) -> anyhow::Result<Box<dyn Collective>> {
    anyhow::bail!(
        "this process is one of {n} that mpirun or srun started, but this softprompt was built \
         without MPI, so each would train alone: build it with `cargo build --release --features mpi`"
    )
}

/// The threads for each rank when the user named none: the cores this process may use, shared
/// with the job's other ranks on this machine unless the launcher bound each rank to its own.
pub fn default_threads() -> Option<usize> {
    if std::env::var_os("RAYON_NUM_THREADS").is_some() {
        return None;
    }
    let local = local_size().filter(|&n| n > 1)?;
    let usable = std::thread::available_parallelism().map_or(1, |n| n.get());
    // SAFETY: sysconf reads a constant of the system.
    let online = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    let bound = usable < online;
    Some(if bound {
        usable
    } else {
        (usable / local).max(1)
    })
}
