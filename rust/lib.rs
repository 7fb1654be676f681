//! treegrpo's Rust core: the rollout forest of Tree-GRPO (selection, advantages, Arrow export).
//!
//! The algorithm modules know nothing of Python; the bindings live in `py/` behind the
//! `python` feature, so `cargo test` covers the core alone.

pub mod advantage;
pub mod arrow;
pub mod error;
pub mod forest;
mod memory;
pub mod pack;
pub mod radix;
pub mod select;

#[cfg(feature = "python")]
mod py;

pub use advantage::{AdvantageStats, Estimator};
pub use error::{Result, TreeError};
pub use forest::{Forest, LeafReason, Node};
pub use select::SelectOptions;
