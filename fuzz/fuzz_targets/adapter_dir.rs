//! An adapter directory from anyone: adapter_config.json, softprompt.json and
//! adapter_model.safetensors (the input's parts, split at `FILE_SEPARATOR`; a missing part is a
//! missing file). `Adapter::load` answers an adapter or an error, never a panic.
#![no_main]
use candle_core::Device;
use libfuzzer_sys::fuzz_target;
use softprompt::adapter::Adapter;
use softprompt_fuzz::{scratch_dir, ADAPTER_FILES, FILE_SEPARATOR};

fuzz_target!(|input: &[u8]| {
    let dir = scratch_dir().join("adapter");
    std::fs::create_dir_all(&dir).unwrap();
    let mut parts = split(input);
    for name in ADAPTER_FILES {
        let path = dir.join(name);
        match parts.next() {
            Some(bytes) => std::fs::write(&path, bytes).unwrap(),
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    // 16: the tiny fixtures' hidden size
    let _ = Adapter::load(&dir, 16, &Device::Cpu);
});

fn split(input: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(input);
    std::iter::from_fn(move || {
        let current = rest?;
        match current
            .windows(FILE_SEPARATOR.len())
            .position(|w| w == FILE_SEPARATOR)
        {
            Some(at) => {
                rest = Some(&current[at + FILE_SEPARATOR.len()..]);
                Some(&current[..at])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}
