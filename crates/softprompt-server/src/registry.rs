//! The adapters a server offers: every subdirectory of the `--adapters` directories, by name.

use anyhow::{bail, Context};
use softprompt::adapter::Adapter;
use softprompt::backbone::Backbone;
use softprompt::model::Model;
use softprompt::multitask::Task;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

/// Name → task, ready to run on the server's model.
pub type Registry = BTreeMap<String, Arc<Task>>;

/// Loads every adapter directory found one level below each of `dirs`.
pub fn load(model: &Model, dirs: &[impl AsRef<Path>]) -> anyhow::Result<Registry> {
    let mut registry = Registry::new();
    for dir in dirs {
        let dir = dir.as_ref();
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read adapters directory {}", dir.display()))?;
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        paths.sort();
        for path in paths {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .context("adapter directory name is not UTF-8")?
                .to_string();
            if registry.contains_key(&name) {
                bail!(
                    "two adapters are named {name:?} (the second in {})",
                    path.display()
                );
            }
            let adapter = Adapter::load(
                &path,
                model.backbone.hidden_size(),
                &candle_core::Device::Cpu,
            )?;
            registry.insert(name, Arc::new(Task::new(model, &adapter)?));
        }
    }
    Ok(registry)
}
