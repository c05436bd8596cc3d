//! What the fuzz targets share: a scratch directory in memory for the bytes under test (the
//! loaders read files, as they do for users), and the repository's fixtures.

use std::path::{Path, PathBuf};

/// This process's scratch directory (tmpfs where there is one: a file per execution).
pub fn scratch_dir() -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    let dir = base.join(format!("softprompt-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

/// `bytes` as the file `name` in the scratch directory.
pub fn scratch_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch_dir().join(name);
    std::fs::write(&path, bytes).expect("a scratch file");
    path
}

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// Where the adapter target splits its input into the files of an adapter directory.
pub const FILE_SEPARATOR: &[u8] = b"\n--8<--\n";

/// The files of an adapter directory, in the order the adapter target's input holds them.
pub const ADAPTER_FILES: [&str; 3] = [
    softprompt::adapter::CONFIG_FILE,
    softprompt::adapter::EXTRA_FILE,
    softprompt::adapter::WEIGHTS_FILE,
];
