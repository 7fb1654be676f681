//! The rollout forest: an arena of groups (prompts), trees (roots) and nodes (whole agent steps).
//!
//! A node's id is its index in `Forest::nodes`. A child is always created after its parent,
//! so `child id > parent id`: every bottom-up pass is one reverse sweep over the arena, and
//! every top-down pass one forward sweep, without child lists.

use std::collections::HashMap;

use crate::error::{parse_option, Result, TreeError};

/// Sentinel parent of a root.
pub const NO_PARENT: u32 = u32::MAX;

/// Why a leaf ended its episode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LeafReason {
    /// The step gave an answer.
    Answer,
    /// The forced final turn after `max_turns` search-enabled turns.
    ForcedFinal,
    /// Generation hit the per-turn length limit (without a complete action tag).
    Truncated,
    /// The trajectory reached the model's context length (`max_model_len`).
    ContextLimit,
}

impl LeafReason {
    pub const VALID: &'static str = "'answer', 'forced_final', 'truncated', 'context_limit'";
    /// Every reason, in discriminant order (the Arrow dictionary's values).
    pub const ALL: [LeafReason; 4] = [
        LeafReason::Answer,
        LeafReason::ForcedFinal,
        LeafReason::Truncated,
        LeafReason::ContextLimit,
    ];
    const TABLE: [(&'static str, LeafReason); 4] = [
        ("answer", LeafReason::Answer),
        ("forced_final", LeafReason::ForcedFinal),
        ("truncated", LeafReason::Truncated),
        ("context_limit", LeafReason::ContextLimit),
    ];

    pub fn parse(name: &str) -> Result<Self> {
        parse_option("leaf reason", name, &Self::TABLE, Self::VALID)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LeafReason::Answer => "answer",
            LeafReason::ForcedFinal => "forced_final",
            LeafReason::Truncated => "truncated",
            LeafReason::ContextLimit => "context_limit",
        }
    }
}

/// One node's token layout and shape: the root holds the prompt; any other node one complete
/// agent step, its action tokens (the policy's, trained) followed by its observation tokens (the
/// environment's, masked). The fields every sweep reads (parent, tree, leaf, kept, reward) live
/// in compact per-node arrays of `Forest` instead, so sweeps stream a few bytes per node.
#[derive(Clone, Debug)]
pub struct Node {
    pub depth: u32,
    /// Offset of this node's tokens in `Forest::tokens`.
    pub start: usize,
    /// Trained tokens (0 for a root).
    pub action_len: u32,
    /// Masked tokens after the action: the observation, or the prompt for a root.
    pub context_len: u32,
    pub num_children: u32,
}

impl Node {
    pub fn len(&self) -> usize {
        (self.action_len + self.context_len) as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Prompt tokens (roots only: depth 0).
    pub fn prompt_len(&self) -> u32 {
        if self.depth == 0 {
            self.context_len
        } else {
            0
        }
    }
    /// Observation tokens (steps only).
    pub fn observation_len(&self) -> u32 {
        if self.depth == 0 {
            0
        } else {
            self.context_len
        }
    }
}

#[derive(Clone, Debug)]
pub struct Tree {
    /// Index into `Forest::groups`.
    pub group: u32,
    pub root: u32,
    /// The tree's open steps (neither root nor leaf), ascending id: with the root, the
    /// candidates for expansion. A node's kind is fixed at its creation, so this only grows.
    pub open: Vec<u32>,
    /// The tree's leaves, ascending id.
    pub leaves: Vec<u32>,
}

#[derive(Clone, Debug)]
pub struct Group {
    /// The caller's group id (one per prompt/question).
    pub key: i64,
    pub trees: Vec<u32>,
}

#[derive(Clone, Debug, Default)]
pub struct Forest {
    /// Per node (indexed by node id): token layout and shape.
    pub nodes: Vec<Node>,
    /// Per node: the parent's id, `NO_PARENT` at roots.
    pub parent: Vec<u32>,
    /// Per node: its tree.
    pub tree_of: Vec<u32>,
    /// Per node: why the episode ended, for leaves.
    pub leaf: Vec<Option<LeafReason>>,
    /// Per node: leaves only, whether the leaf is among the K kept for training.
    pub kept: Vec<bool>,
    /// Per node: the outcome reward of a leaf, NaN while unset (set rewards are finite).
    pub reward: Vec<f64>,
    /// Per node: the mean log-probability of a step's action tokens under the policy that
    /// sampled them (set on add), NaN where unknown (roots, steps added without one).
    pub mean_log_prob: Vec<f64>,
    /// Every leaf's id, ascending (a node is a leaf from its creation on).
    pub leaf_ids: Vec<u32>,
    pub tokens: Vec<u32>,
    pub trees: Vec<Tree>,
    pub groups: Vec<Group>,
    group_index: HashMap<i64, u32>,
    /// Bumped by every change: statistics computed at another generation describe an earlier
    /// forest (`AdvantageStats::is_current`), so they never go stale silently.
    generation: u64,
}

impl Forest {
    pub fn new() -> Self {
        Self::default()
    }

    /// How many changes the forest has seen (every added node, reward write and K-subsample).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Record a change made outside this module (K-subsampling).
    pub(crate) fn changed(&mut self) {
        self.generation += 1;
    }

    pub fn num_leaves(&self) -> usize {
        self.leaf_ids.len()
    }

    pub fn is_root(&self, id: u32) -> bool {
        self.parent[id as usize] == NO_PARENT
    }

    /// The reward of a leaf, if set.
    pub fn reward_of(&self, id: u32) -> Option<f64> {
        let r = self.reward[id as usize];
        (!r.is_nan()).then_some(r)
    }

    pub fn node(&self, id: u64) -> Result<&Node> {
        usize::try_from(id)
            .ok()
            .and_then(|i| self.nodes.get(i))
            .ok_or(TreeError::UnknownNode {
                node: id as i64,
                len: self.nodes.len(),
            })
    }

    pub(crate) fn check_id(&self, id: u64) -> Result<u32> {
        self.node(id).map(|_| id as u32)
    }

    /// The node's own tokens: (action, context) where context is the observation, or the prompt of a root.
    pub fn node_tokens(&self, id: u32) -> (&[u32], &[u32]) {
        let n = &self.nodes[id as usize];
        let a = &self.tokens[n.start..n.start + n.action_len as usize];
        let c = &self.tokens[n.start + n.action_len as usize..n.start + n.len()];
        (a, c)
    }

    fn push_node(
        &mut self,
        node: Node,
        (parent, tree, leaf, mean_log_prob): (u32, u32, Option<LeafReason>, f64),
        action: &[u32],
        context: &[u32],
    ) -> Result<u32> {
        let id = u32::try_from(self.nodes.len())
            .ok()
            .filter(|&id| id != NO_PARENT)
            .ok_or_else(|| TreeError::InvalidArgument("a forest holds at most 2^32 - 1 nodes".into()))?;
        self.tokens.extend_from_slice(action);
        self.tokens.extend_from_slice(context);
        let t = &mut self.trees[tree as usize];
        if leaf.is_some() {
            t.leaves.push(id);
            self.leaf_ids.push(id);
        } else if parent != NO_PARENT {
            t.open.push(id);
        }
        self.nodes.push(node);
        self.parent.push(parent);
        self.tree_of.push(tree);
        self.leaf.push(leaf);
        self.kept.push(leaf.is_some());
        self.reward.push(f64::NAN);
        self.mean_log_prob.push(mean_log_prob);
        self.generation += 1;
        Ok(id)
    }

    /// Add a tree for `group` whose root holds the prompt tokens. Returns the root's id.
    pub fn add_root(&mut self, group: i64, prompt: &[u32]) -> Result<u32> {
        let context_len = len_u32(prompt.len(), "prompt")?;
        let next_group = self.groups.len() as u32;
        let g = *self.group_index.entry(group).or_insert(next_group);
        if g == next_group {
            self.groups.push(Group {
                key: group,
                trees: Vec::new(),
            });
        }
        let tree = self.trees.len() as u32;
        self.groups[g as usize].trees.push(tree);
        self.trees.push(Tree {
            group: g,
            root: self.nodes.len() as u32,
            open: Vec::new(),
            leaves: Vec::new(),
        });
        let node = Node {
            depth: 0,
            start: self.tokens.len(),
            action_len: 0,
            context_len,
            num_children: 0,
        };
        self.push_node(node, (NO_PARENT, tree, None, f64::NAN), &[], prompt)
    }

    /// Add one complete agent step under `parent`. A leaf (`leaf = Some(reason)`) ends the episode.
    pub fn add_step(
        &mut self,
        parent: u64,
        action: &[u32],
        observation: &[u32],
        leaf: Option<LeafReason>,
    ) -> Result<u32> {
        self.add_scored_step(parent, action, observation, leaf, f64::NAN)
    }

    /// [`Forest::add_step`] with the mean log-probability of the step's action tokens (NaN =
    /// unknown), which the surprisal selection policy weighs the step by.
    pub fn add_scored_step(
        &mut self,
        parent: u64,
        action: &[u32],
        observation: &[u32],
        leaf: Option<LeafReason>,
        mean_log_prob: f64,
    ) -> Result<u32> {
        let parent = self.check_id(parent)?;
        if let Some(reason) = self.leaf[parent as usize] {
            return Err(TreeError::StepUnderLeaf {
                node: parent,
                reason: reason.as_str(),
            });
        }
        let node = Node {
            depth: self.nodes[parent as usize].depth + 1,
            start: self.tokens.len(),
            action_len: len_u32(action.len(), "action")?,
            context_len: len_u32(observation.len(), "observation")?,
            num_children: 0,
        };
        let tree = self.tree_of[parent as usize];
        let id = self.push_node(node, (parent, tree, leaf, mean_log_prob), action, observation)?;
        self.nodes[parent as usize].num_children += 1;
        Ok(id)
    }

    /// Set the outcome reward of leaves; all are checked before any is written.
    pub fn set_rewards(&mut self, leaves: &[u64], rewards: &[f64]) -> Result<()> {
        if leaves.len() != rewards.len() {
            return Err(TreeError::InvalidArgument(format!(
                "set_rewards got {} leaves and {} rewards: pass one reward per leaf",
                leaves.len(),
                rewards.len()
            )));
        }
        let mut ids = Vec::with_capacity(leaves.len());
        for (&leaf, &value) in leaves.iter().zip(rewards) {
            let id = self.check_id(leaf)?;
            if self.leaf[id as usize].is_none() {
                return Err(TreeError::RewardOnNonLeaf { node: id });
            }
            if !value.is_finite() {
                return Err(TreeError::NonFiniteReward { node: id, value });
            }
            ids.push(id);
        }
        for (id, &value) in ids.into_iter().zip(rewards) {
            self.reward[id as usize] = value;
        }
        self.generation += 1;
        Ok(())
    }

    /// The path root -> `node`, root first (`node` must be a valid id; see [`Forest::path_of`]).
    pub fn path(&self, node: u32) -> Vec<u32> {
        let mut path = vec![node];
        let mut cur = node;
        while self.parent[cur as usize] != NO_PARENT {
            cur = self.parent[cur as usize];
            path.push(cur);
        }
        path.reverse();
        path
    }

    /// The path root -> `node`, root first, for an id from outside.
    pub fn path_of(&self, node: u64) -> Result<Vec<u32>> {
        self.check_id(node).map(|id| self.path(id))
    }

    /// The context to continue `node` from: the prompt and every step's tokens through the
    /// node's own observation (the token ids of [`Forest::trajectory`], without the mask).
    pub fn context(&self, node: u64) -> Result<Vec<u32>> {
        let node = self.check_id(node)?;
        let path = self.path(node);
        let total: usize = path.iter().map(|&id| self.nodes[id as usize].len()).sum();
        let mut tokens = Vec::with_capacity(total);
        for id in path {
            let n = &self.nodes[id as usize];
            tokens.extend_from_slice(&self.tokens[n.start..n.start + n.len()]);
        }
        Ok(tokens)
    }

    /// A leaf's training sequence: prompt + every step on its path, with the loss mask
    /// (1 on action tokens, 0 on prompt and observation tokens).
    pub fn trajectory(&self, leaf: u64) -> Result<(Vec<u32>, Vec<u8>)> {
        let leaf = self.check_id(leaf)?;
        let path = self.path(leaf);
        let total: usize = path.iter().map(|&id| self.nodes[id as usize].len()).sum();
        let mut tokens = Vec::with_capacity(total);
        let mut mask = Vec::with_capacity(total);
        for id in path {
            let (action, context) = self.node_tokens(id);
            tokens.extend_from_slice(action);
            tokens.extend_from_slice(context);
            mask.extend(std::iter::repeat_n(1u8, action.len()));
            mask.extend(std::iter::repeat_n(0u8, context.len()));
        }
        Ok((tokens, mask))
    }
}

fn len_u32(len: usize, what: &str) -> Result<u32> {
    u32::try_from(len).map_err(|_| {
        TreeError::InvalidArgument(format!("{what} has {len} tokens; at most 2^32 - 1 per node"))
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// root(prompt 1 2 3) -> a(action 4 5, observation 6) -> b(action 7, leaf).
    pub(crate) fn small() -> (Forest, u32, u32, u32) {
        let mut f = Forest::new();
        let root = f.add_root(7, &[1, 2, 3]).unwrap();
        let a = f.add_step(root as u64, &[4, 5], &[6], None).unwrap();
        let b = f.add_step(a as u64, &[7], &[], Some(LeafReason::Answer)).unwrap();
        (f, root, a, b)
    }

    #[test]
    fn builds_and_assembles_trajectories() {
        let (f, root, a, b) = small();
        assert_eq!((root, a, b), (0, 1, 2));
        assert_eq!(f.nodes[b as usize].depth, 2);
        let (tokens, mask) = f.trajectory(b as u64).unwrap();
        assert_eq!(tokens, vec![1, 2, 3, 4, 5, 6, 7]);
        assert_eq!(mask, vec![0, 0, 0, 1, 1, 0, 1]);
    }

    #[test]
    fn rejects_bad_steps_and_rewards_without_changing_anything() {
        let (mut f, root, a, b) = small();
        let before = (f.nodes.len(), f.tokens.len());
        assert!(matches!(
            f.add_step(b as u64, &[1], &[], None),
            Err(TreeError::StepUnderLeaf { .. })
        ));
        assert!(matches!(
            f.add_step(99, &[1], &[], None),
            Err(TreeError::UnknownNode { .. })
        ));
        assert_eq!((f.nodes.len(), f.tokens.len()), before);
        assert!(matches!(
            f.set_rewards(&[a as u64], &[1.0]),
            Err(TreeError::RewardOnNonLeaf { .. })
        ));
        assert!(matches!(
            f.set_rewards(&[b as u64, root as u64], &[1.0, 1.0]),
            Err(TreeError::RewardOnNonLeaf { .. })
        ));
        assert_eq!(f.reward_of(b), None, "a failed batch writes nothing");
        assert!(matches!(
            f.set_rewards(&[b as u64], &[f64::NAN]),
            Err(TreeError::NonFiniteReward { .. })
        ));
        assert!(matches!(
            f.set_rewards(&[b as u64], &[f64::INFINITY]),
            Err(TreeError::NonFiniteReward { .. })
        ));
    }

    #[test]
    fn contexts_and_paths_read_the_forest() {
        let (mut f, root, a, b) = small();
        assert_eq!(f.context(a as u64).unwrap(), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(f.context(root as u64).unwrap(), vec![1, 2, 3]);
        assert_eq!(f.context(b as u64).unwrap(), f.trajectory(b as u64).unwrap().0);
        assert_eq!(f.path_of(b as u64).unwrap(), vec![root, a, b]);
        assert!(matches!(f.context(9), Err(TreeError::UnknownNode { .. })));
        assert!(matches!(f.path_of(9), Err(TreeError::UnknownNode { .. })));
        let c = f.add_scored_step(a as u64, &[8], &[], None, -0.25).unwrap();
        assert_eq!(f.mean_log_prob[c as usize], -0.25);
        assert!(f.mean_log_prob[..3].iter().all(|m| m.is_nan()));
    }

    #[test]
    fn groups_are_keyed_by_the_callers_id() {
        let mut f = Forest::new();
        f.add_root(-5, &[1]).unwrap();
        f.add_root(3, &[1]).unwrap();
        f.add_root(-5, &[2]).unwrap();
        assert_eq!(f.groups.len(), 2);
        assert_eq!(f.groups[0].trees, vec![0, 2]);
        assert_eq!(f.trees[2].group, 0);
    }
}
