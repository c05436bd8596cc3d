//! Files are written whole or not at all: to a temporary name in the same directory, then renamed.

use crate::Context;
use candle_core::Tensor;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

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
    tensors_from_bytes(&bytes, path, device)
}

/// `load_tensors` of a file's bytes already read (`path` names it in errors).
pub fn tensors_from_bytes(
    bytes: &[u8],
    path: &Path,
    device: &candle_core::Device,
) -> crate::Result<(HashMap<String, Tensor>, HashMap<String, String>)> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let tensors = candle_core::safetensors::load_buffer(bytes, device)
        .with_context(|| format!("cannot load the tensors of {}", path.display()))?;
    Ok((tensors, meta.metadata().clone().unwrap_or_default()))
}

/// A directory that one process writes at a time, held by the operating system's lock on
/// `DIR/.lock` (which also holds the writer's process id, for the message): the lock goes with
/// the process, however it ends, so a killed run leaves nothing that blocks the next one.
pub struct DirLock {
    /// locked while open
    _file: std::fs::File,
}

impl DirLock {
    /// Takes `dir` (made if missing) for `what`, or says which process holds it.
    pub fn acquire(dir: &Path, what: &str) -> crate::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(".lock");
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = match holder.trim() {
                    "" => String::new(),
                    pid => format!(" (process {pid})"),
                };
                crate::bail!(
                    "{} is in use by another {what}{holder}; wait for it to end, or choose another directory",
                    dir.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        file.set_len(0)?;
        write!(file, "{}", std::process::id())
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self { _file: file })
    }
}
