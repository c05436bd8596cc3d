//! `Collective` over MPI (rsmpi over the system's MPI library: Open MPI, MPICH), for
//! `mpirun -np N softprompt train ...` and Slurm's `srun`.

use super::Collective;
use crate::{Error, Result};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Root};
use mpi::Threading;
use std::sync::Mutex;

/// The world of an MPI job: every rank `mpirun` or `srun` started. MPI ends (`MPI_Finalize`)
/// when it drops.
pub struct Mpi {
    universe: Universe,
    /// MPI is initialised "serialized": any thread may call it, one at a time. The training loop
    /// runs on a rayon worker, not on the thread that initialised MPI.
    calls: Mutex<()>,
    rank: usize,
    size: usize,
}

impl Mpi {
    /// Joins the job this process was started in (a lone process makes a world of one).
    pub fn initialize() -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| Error::Invalid("MPI was already initialised in this process".into()))?;
        if threading < Threading::Serialized {
            return Err(Error::Invalid(format!(
                "this MPI library gives threads {threading:?} support; softprompt needs Serialized"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        Ok(Self {
            universe,
            calls: Mutex::new(()),
            rank,
            size,
        })
    }

    /// The host this rank runs on, as MPI names it.
    pub fn host(&self) -> String {
        mpi::environment::processor_name().unwrap_or_else(|_| "?".into())
    }

    fn world(&self) -> (std::sync::MutexGuard<'_, ()>, SimpleCommunicator) {
        // a poisoned lock only means another call panicked; MPI itself is unharmed
        let guard = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        (guard, self.universe.world())
    }
}

impl Collective for Mpi {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn all_reduce_sum(&self, values: &mut [f32]) -> Result<()> {
        let (_guard, world) = self.world();
        let send = values.to_vec();
        world.all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        let (_guard, world) = self.world();
        let send = values.to_vec();
        world.all_reduce_into(&send[..], values, SystemOperation::sum());
        Ok(())
    }

    fn broadcast(&self, bytes: &mut Vec<u8>) -> Result<()> {
        let (_guard, world) = self.world();
        let root = world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        root.broadcast_into(&mut bytes[..]);
        Ok(())
    }

    fn barrier(&self) -> Result<()> {
        let (_guard, world) = self.world();
        world.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.universe.world().abort(code)
    }
}
