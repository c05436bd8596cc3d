//! Files are written whole or not at all: to a temporary name in the same directory, then renamed.

use crate::Context;
use candle_core::Tensor;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

pub fn write_atomic(path: &Path, bytes: &[u8]) -> crate::Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let written = std::fs::write(&tmp, bytes)
        .with_context(|| format!("cannot write {}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot move {} into place", path.display()))
        });
    if written.is_err() {
        // a half-written file is nobody's: it goes
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Writes named tensors (and string metadata) as one safetensors file, atomically.
pub fn save_tensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
) -> crate::Result<()> {
    let contiguous: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let bytes = safetensors::serialize(contiguous.iter().map(|(n, t)| (n.as_str(), t)), metadata)
        .with_context(|| format!("cannot serialise {}", path.display()))?;
    write_atomic(path, &bytes)
}

/// Reads a safetensors file: its tensors and its string metadata.
pub fn load_tensors(
    path: &Path,
    device: &candle_core::Device,
) -> crate::Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .with_context(|| format!("cannot load the tensors of {}", path.display()))?;
    Ok((tensors, meta.metadata().clone().unwrap_or_default()))
}

/// A directory that one process writes at a time: `DIR/.lock` holds the writer's process id, and
/// goes when the lock is dropped. A lock whose process is gone (killed) is taken over.
pub struct DirLock {
    path: PathBuf,
}

impl DirLock {
    /// Takes `dir` (made if missing) for `what`, or says which process holds it.
    pub fn acquire(dir: &Path, what: &str) -> crate::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(".lock");
        for _ in 0..2 {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    write!(file, "{}", std::process::id())
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    return Ok(Self { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = std::fs::read_to_string(&path).unwrap_or_default();
                    match holder.trim().parse::<u32>() {
                        Ok(pid) if process_alive(pid) => crate::bail!(
                            "{} is in use by another {what} (process {pid}); wait for it to end, or choose another directory",
                            dir.display()
                        ),
                        // its process is gone: the lock is stale
                        _ => {
                            let _ = std::fs::remove_file(&path);
                        }
                    }
                }
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()))
                }
            }
        }
        crate::bail!(
            "{} is being taken by another {what} right now",
            dir.display()
        )
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether a process of that id runs on this machine; where that cannot be told, it is assumed to.
fn process_alive(pid: u32) -> bool {
    match Path::new("/proc/self").exists() {
        true => Path::new(&format!("/proc/{pid}")).exists(),
        false => true,
    }
}
