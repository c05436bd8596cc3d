//! The library's integration tests, built as one binary.

mod bf16;
mod data;
mod generation;
mod gradients;
mod inference;
mod models;
mod parity;
mod peft;
mod prefix;
mod probe;
mod prompt_init;
mod t5;
mod tokenize;

use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn assets() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets")
}

/// The largest absolute value in a tensor.
pub fn max_abs(t: &candle_core::Tensor) -> f64 {
    let t = t.to_dtype(candle_core::DType::F64).unwrap();
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// The largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let f64 = |t: &candle_core::Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
    max_abs(&(f64(a) - f64(b)).unwrap())
}
