//! Fine-tuning: losses, optimiser and schedule, gradient clipping. Gradients come from candle's
//! reverse-mode autodiff through the same model code inference uses (see `nn`).

pub mod cache;
pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod gradcheck;
pub mod loss;
pub mod mine;
pub mod optim;
pub mod trainer;
