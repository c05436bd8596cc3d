//! A safetensors file from anyone (an adapter's, a model's, a checkpoint's): its header and
//! tensors load or are refused, never a panic.
#![no_main]
use candle_core::Device;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let path = softprompt_fuzz::scratch_file("file.safetensors", input);
    let _ = softprompt::files::load_tensors(&path, &Device::Cpu);
});
