//! Task heads: what reads the backbone's last hidden state, and the loss.

pub mod classify;
