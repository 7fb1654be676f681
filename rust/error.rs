//! The one error type of the core. Every variant says what went wrong and what to do;
//! `rust/py/error.rs` maps each to a named Python exception.

use thiserror::Error;

/// Errors raised by the forest, the radix index and packing. A failed call leaves its
/// object unchanged: every method validates before it mutates.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum TreeError {
    #[error("unknown node id {node}: this forest has {len} nodes (ids 0..{len}); use an id returned by add_root/add_step")]
    UnknownNode { node: i64, len: usize },

    #[error("node {node} is a leaf ({reason}): a leaf ends its episode and is never expanded; add the step under an open node")]
    StepUnderLeaf { node: u32, reason: &'static str },

    #[error("node {node} is not a leaf: rewards are outcome rewards and belong on leaves (add the final step with leaf=True)")]
    RewardOnNonLeaf { node: u32 },

    #[error("reward {value} for leaf {node} is not finite: NaN or infinite rewards are an error, fix the reward function")]
    NonFiniteReward { node: u32, value: f64 },

    #[error("{count} kept leaves have no reward (first: {first:?}): call set_reward on every kept leaf before advantages()")]
    MissingReward { count: usize, first: Vec<u32> },

    #[error("cannot keep k={k} leaves in tree {tree}: it has only {leaves}; use k <= {leaves} (a tree of (M, N, L) ends with 1 + L*N leaves)")]
    KTooLarge { k: usize, tree: u32, leaves: usize },

    #[error("unknown {what} {got:?}: valid values are {valid}")]
    UnknownOption {
        what: &'static str,
        got: String,
        valid: &'static str,
    },

    #[error(
        "leaf {node} has no advantage: call advantages() after setting rewards (only kept leaves get one)"
    )]
    NoAdvantage { node: u32 },

    #[error("{0}")]
    InvalidArgument(String),

    #[error("token id {value} at position {position} is not a u32: token ids are integers in [0, 2^32)")]
    InvalidToken { position: usize, value: String },

    #[error("unknown or evicted radix node handle {handle}: handles die when their node is evicted; match_prefix again")]
    StaleHandle { handle: u64 },

    #[error("dec_lock_ref on radix node {handle} whose lock count is 0: every dec_lock_ref needs an earlier inc_lock_ref")]
    LockUnderflow { handle: u64 },
}

pub type Result<T> = std::result::Result<T, TreeError>;

/// Parse a string option against its valid values; the error lists them.
pub(crate) fn parse_option<T: Copy>(
    what: &'static str,
    got: &str,
    table: &[(&'static str, T)],
    valid: &'static str,
) -> Result<T> {
    table
        .iter()
        .find(|(name, _)| *name == got)
        .map(|(_, value)| *value)
        .ok_or_else(|| TreeError::UnknownOption {
            what,
            got: got.to_string(),
            valid,
        })
}
