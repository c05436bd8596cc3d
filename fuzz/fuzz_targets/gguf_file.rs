//! A GGUF model file from anyone: its metadata is read and checked, and a file that is not a
//! llama model the engine can run is refused, never a panic.
#![no_main]
use candle_core::{DType, Device};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let path = softprompt_fuzz::scratch_file("model.gguf", input);
    let _ = softprompt::model::Model::load(&path, DType::F32, &Device::Cpu);
});
