//! The adapters a server offers, by name: every subdirectory of the `--adapters` directories at
//! start, and while serving whatever `POST /v1/adapters` loads from those same directories (a name
//! is one plain path component, so a request cannot reach outside them).

use softprompt::adapter::{Adapter, AdapterHead, CONFIG_FILE};
use softprompt::backbone::Backbone;
use softprompt::generate::{prefix_cache, PromptCache};
use softprompt::inference::LoadedAdapter;
use softprompt::model::Model;
use softprompt::template::Template;
use softprompt::tokenize::TextEncoder;
use softprompt::{bail, Context};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(
        "{0:?} is not an adapter name (letters, digits, '-', '_' and '.', not starting with '.')"
    )]
    BadName(String),
    #[error("no adapter named {0:?}")]
    NotFound(String),
    #[error("adapter {0:?} is already loaded")]
    AlreadyLoaded(String),
    /// the directory is there but is not an adapter for this model
    #[error("adapter {0:?}: {chain}", chain = .1.chain())]
    Invalid(String, softprompt::Error),
    /// a generation adapter asked to classify
    #[error("adapter {0:?} generates text and has no labels: use /v1/generate")]
    NotAClassifier(String),
    /// generation asked of an encoder model's adapter
    #[error("adapter {0:?} cannot generate: the model is an encoder (generation needs GPT-2 or the Llama family)")]
    NotAGenerator(String),
    /// a multitask adapter asked without a task, or with one it does not have; a task named for
    /// an adapter of one
    #[error("adapter {0:?}: {1}")]
    Task(String, String),
}

/// What `/v1/generate` needs of an adapter: its prompt already read (a prefix cache) and its template.
pub struct Generator {
    pub prefix: PromptCache,
    pub template: Option<Template>,
}

/// What one task of an adapter can do on this model.
#[derive(Clone)]
pub struct Served {
    /// label scores (a linear head or a verbalizer); none for a generation adapter
    pub classifier: Option<Arc<LoadedAdapter>>,
    /// on a decoder model
    pub generator: Option<Arc<Generator>>,
}

/// One loaded adapter: what each of its tasks can do (a multitask adapter's by task name).
#[derive(Clone)]
pub struct Entry {
    /// a multitask adapter's tasks, in the order of `served`; empty for an adapter of one task
    pub tasks: Vec<String>,
    /// one for each task (one in all for an adapter of one task)
    pub served: Vec<Served>,
    pub prompt_len: usize,
}

impl Entry {
    /// What `task` of the adapter `name` serves: a multitask adapter needs one of its tasks named,
    /// any other adapter none.
    pub fn task(&self, name: &str, task: Option<&str>) -> Result<&Served, RegistryError> {
        let error = |message: String| RegistryError::Task(name.into(), message);
        let tasks = self.tasks.join(", ");
        match (task, self.tasks.is_empty()) {
            (None, true) => Ok(&self.served[0]),
            (Some(task), true) => Err(error(format!(
                "it serves one task, and the request names the task {task:?}: drop \"task\""
            ))),
            (None, false) => Err(error(format!(
                "a multitask prompt: name one of its tasks in \"task\" ({tasks})"
            ))),
            (Some(task), false) => match self.tasks.iter().position(|t| t == task) {
                Some(t) => Ok(&self.served[t]),
                None => Err(error(format!("no task {task:?} (its tasks: {tasks})"))),
            },
        }
    }
}

pub struct Registry {
    pub model: Arc<Model>,
    roots: Vec<PathBuf>,
    entries: RwLock<BTreeMap<String, Entry>>,
    /// cuts inputs to `max_input_tokens`; every loaded prompt leaves room for that many
    pub encoder: TextEncoder,
}

impl Registry {
    /// Loads every adapter one level below each of `roots`. Inputs may have `max_input_tokens`
    /// tokens, or by default what the longest of these prompts leaves of the model's positions.
    pub fn open(
        model: Arc<Model>,
        roots: &[PathBuf],
        max_input_tokens: Option<usize>,
    ) -> softprompt::Result<Self> {
        let mut found = BTreeMap::new();
        for root in roots {
            let entries = std::fs::read_dir(root)
                .with_context(|| format!("cannot read adapters directory {}", root.display()))?;
            for path in entries.filter_map(|e| e.ok().map(|e| e.path())) {
                let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                    tracing::warn!("skipping {}: not a UTF-8 name", path.display());
                    continue;
                };
                let name = name.to_string();
                // .git, lost+found and the like sit beside adapters and are none
                if !is_plain_name(&name) || !path.join(CONFIG_FILE).is_file() {
                    tracing::warn!("skipping {}: not an adapter directory", path.display());
                    continue;
                }
                let path = match inside(root, &path) {
                    Ok(path) => path,
                    Err(e) => {
                        tracing::warn!("skipping {}: {}", path.display(), e.chain());
                        continue;
                    }
                };
                let adapter = read_adapter(&model, &path).map_err(|e| {
                    softprompt::Error::invalid(RegistryError::Invalid(name.clone(), e))
                })?;
                if let Some((first, _)) = found.insert(name.clone(), (path.clone(), adapter)) {
                    bail!(
                        "two adapters are named {name:?}: {} and {}",
                        first.display(),
                        path.display()
                    );
                }
            }
        }
        let positions = model.backbone.max_positions();
        let longest = found
            .values()
            .map(|(_, a)| a.prompt.dims()[0])
            .max()
            .unwrap_or(0);
        let room = positions.saturating_sub(longest);
        let max_input_tokens =
            max_input_tokens.unwrap_or(room.min(crate::config::DEFAULT_MAX_INPUT_TOKENS));
        let encoder = model.encoder(positions.saturating_sub(max_input_tokens), None)?;
        let registry = Self {
            roots: roots.to_vec(),
            entries: RwLock::new(BTreeMap::new()),
            encoder,
            model,
        };
        for (name, (_, adapter)) in found {
            registry
                .insert(name.clone(), &adapter)
                .map_err(softprompt::Error::invalid)?;
        }
        Ok(registry)
    }

    /// The classifier named `name` (for `task`, of a multitask adapter).
    pub fn classifier(
        &self,
        name: &str,
        task: Option<&str>,
    ) -> Result<Arc<LoadedAdapter>, RegistryError> {
        let entry = self.entry(name)?;
        entry
            .task(name, task)?
            .classifier
            .clone()
            .ok_or_else(|| RegistryError::NotAClassifier(name.into()))
    }

    /// The generator named `name` (for `task`, of a multitask adapter).
    pub fn generator(
        &self,
        name: &str,
        task: Option<&str>,
    ) -> Result<Arc<Generator>, RegistryError> {
        let entry = self.entry(name)?;
        entry
            .task(name, task)?
            .generator
            .clone()
            .ok_or_else(|| RegistryError::NotAGenerator(name.into()))
    }

    fn entry(&self, name: &str) -> Result<Entry, RegistryError> {
        self.read()
            .get(name)
            .cloned()
            .ok_or_else(|| RegistryError::NotFound(name.into()))
    }

    pub fn list(&self) -> Vec<(String, Entry)> {
        self.read()
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Loads `name` from the first adapters directory that has it.
    pub fn load(&self, name: &str) -> Result<Entry, RegistryError> {
        if !is_plain_name(name) {
            return Err(RegistryError::BadName(name.into()));
        }
        if self.read().contains_key(name) {
            return Err(RegistryError::AlreadyLoaded(name.into()));
        }
        let (root, path) = self
            .roots
            .iter()
            .map(|root| (root, root.join(name)))
            .find(|(_, p)| p.is_dir())
            .ok_or_else(|| RegistryError::NotFound(name.into()))?;
        let invalid = |e| RegistryError::Invalid(name.into(), e);
        let path = inside(root, &path).map_err(invalid)?;
        let adapter = read_adapter(&self.model, &path).map_err(invalid)?;
        self.insert(name.to_string(), &adapter)
    }

    /// Forgets `name`; requests already holding it finish with it.
    pub fn unload(&self, name: &str) -> Result<(), RegistryError> {
        self.entries
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name)
            .map(drop)
            .ok_or_else(|| RegistryError::NotFound(name.into()))
    }

    /// Makes `adapter` ready to serve as `name`; a name taken meanwhile (a concurrent load of the
    /// same adapter) is `AlreadyLoaded`.
    fn insert(&self, name: String, adapter: &Adapter) -> Result<Entry, RegistryError> {
        let entry = self
            .prepare(adapter)
            .map_err(|e| RegistryError::Invalid(name.clone(), e))?;
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        if entries.contains_key(&name) {
            return Err(RegistryError::AlreadyLoaded(name));
        }
        entries.insert(name, entry.clone());
        Ok(entry)
    }

    /// What serving `adapter` on this model needs: each task's loaded head and prefix cache.
    fn prepare(&self, adapter: &Adapter) -> softprompt::Result<Entry> {
        adapter.fits(&self.model.backbone)?;
        let room = self.model.backbone.max_positions();
        let prompt_len = adapter.prompt.dims()[0];
        let needs = prompt_len + self.encoder.max_tokens();
        if needs > room {
            bail!(
                "its prompt of {} vectors and inputs of up to {} tokens need {needs} positions; the model has {room} (lower --max-input-tokens)",
                prompt_len,
                self.encoder.max_tokens()
            );
        }
        let tasks = adapter
            .tasks
            .as_ref()
            .map_or(Vec::new(), |t| t.names.clone());
        let served = match tasks.is_empty() {
            true => vec![self.serve(adapter)?],
            false => tasks
                .iter()
                .map(|t| self.serve(&*adapter.for_task(Some(t))?))
                .collect::<softprompt::Result<_>>()?,
        };
        Ok(Entry {
            tasks,
            served,
            prompt_len,
        })
    }

    /// An adapter of one task made ready: its loaded head, its prefix cache.
    fn serve(&self, adapter: &Adapter) -> softprompt::Result<Served> {
        let classifier = match adapter.head {
            AdapterHead::Generation => None,
            _ => Some(Arc::new(LoadedAdapter::new(&self.model, adapter)?)),
        };
        // a decoder or an encoder-decoder: whatever has an LM head writes
        let generator = match self.model.backbone.lm_head() {
            Some(_) => Some(Arc::new(Generator {
                prefix: prefix_cache(&self.model.backbone, &adapter.prompt, adapter.placement())?,
                template: adapter.template.clone(),
            })),
            None => None,
        };
        if classifier.is_none() && generator.is_none() {
            bail!("a generation adapter needs a decoder model, and this one is an encoder");
        }
        Ok(Served {
            classifier,
            generator,
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        // a panic elsewhere while holding the lock leaves the map itself intact
        self.entries.read().unwrap_or_else(|e| e.into_inner())
    }
}

/// The adapter in `path`; its errors name it by its directory's name, not by where the server
/// keeps it.
fn read_adapter(model: &Model, path: &Path) -> softprompt::Result<Adapter> {
    let hidden = model.backbone.hidden_size();
    Adapter::load(path, hidden, &candle_core::Device::Cpu).map_err(|e| {
        let name = path.file_name().map_or("?".into(), |n| n.to_string_lossy());
        let message = e.chain().replace(&path.display().to_string(), &name);
        softprompt::Error::Invalid(message)
    })
}

/// A name that is one plain path component: letters, digits, '-', '_' and '.', not starting with '.'.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// `path`, which must stay inside `root` once symbolic links are followed: an adapters directory
/// is the only place adapters come from.
fn inside(root: &Path, path: &Path) -> softprompt::Result<PathBuf> {
    let (root, real) = (root.canonicalize()?, path.canonicalize()?);
    if !real.starts_with(&root) {
        bail!("it is a link to outside the adapters directory");
    }
    Ok(real)
}
