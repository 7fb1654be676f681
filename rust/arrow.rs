//! The Arrow schemas of every table treegrpo exports, defined once here
//! (documented in docs/architecture.md), and their builders.

use std::sync::Arc;

use arrow_array::builder::StringDictionaryBuilder;
use arrow_array::types::Int8Type;
use arrow_array::{ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, UInt32Array};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef};

use crate::forest::{Forest, NO_PARENT};

fn dict_utf8() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int8), Box::new(DataType::Utf8))
}

/// One row per node.
pub fn nodes_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("node", DataType::UInt32, false),
        Field::new("parent", DataType::UInt32, true),
        Field::new("tree", DataType::UInt32, false),
        Field::new("group", DataType::Int64, false),
        Field::new("depth", DataType::UInt32, false),
        Field::new("prompt_len", DataType::UInt32, false),
        Field::new("action_len", DataType::UInt32, false),
        Field::new("observation_len", DataType::UInt32, false),
        Field::new("num_children", DataType::UInt32, false),
        Field::new("is_leaf", DataType::Boolean, false),
        Field::new("leaf_reason", dict_utf8(), true),
        Field::new("kept", DataType::Boolean, false),
        Field::new("reward", DataType::Float64, true),
        Field::new("kept_leaves", DataType::UInt32, true),
        Field::new("value", DataType::Float64, true),
        Field::new("advantage_sum", DataType::Float64, true),
    ]))
}

/// One row per leaf (kept or not).
pub fn leaves_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("leaf", DataType::UInt32, false),
        Field::new("tree", DataType::UInt32, false),
        Field::new("group", DataType::Int64, false),
        Field::new("depth", DataType::UInt32, false),
        Field::new("leaf_reason", dict_utf8(), false),
        Field::new("kept", DataType::Boolean, false),
        Field::new("reward", DataType::Float64, true),
        Field::new("length", DataType::UInt32, false),
        Field::new("action_tokens", DataType::UInt32, false),
    ]))
}

/// One row per kept leaf: the result of `Forest::advantages`.
pub fn advantages_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("leaf", DataType::UInt32, false),
        Field::new("tree", DataType::UInt32, false),
        Field::new("group", DataType::Int64, false),
        Field::new("reward", DataType::Float64, false),
        Field::new("a_inter", DataType::Float64, false),
        Field::new("a_intra", DataType::Float64, false),
        Field::new("advantage", DataType::Float64, false),
    ]))
}

fn u32s(values: impl Iterator<Item = u32>) -> ArrayRef {
    Arc::new(values.collect::<UInt32Array>())
}

fn reasons<'a>(values: impl Iterator<Item = Option<&'a str>>) -> Result<ArrayRef, ArrowError> {
    let mut b = StringDictionaryBuilder::<Int8Type>::new();
    for v in values {
        match v {
            Some(s) => {
                b.append(s)?;
            }
            None => b.append_null(),
        }
    }
    Ok(Arc::new(b.finish()))
}

impl Forest {
    fn group_key(&self, tree: u32) -> i64 {
        self.groups[self.trees[tree as usize].group as usize].key
    }

    /// Every node, with the per-node statistics of the last `advantages` call (null before one).
    pub fn nodes_batch(&self) -> Result<RecordBatch, ArrowError> {
        let n = &self.nodes;
        let stats = self.last_stats();
        let stat_u32 = |f: &dyn Fn(usize) -> u32| -> ArrayRef {
            Arc::new((0..n.len()).map(|i| stats.map(|_| f(i))).collect::<UInt32Array>())
        };
        let stat_f64 = |f: &dyn Fn(usize) -> f64| -> ArrayRef {
            Arc::new(
                (0..n.len())
                    .map(|i| stats.map(|_| f(i)).filter(|v| !v.is_nan()))
                    .collect::<Float64Array>(),
            )
        };
        let columns: Vec<ArrayRef> = vec![
            u32s(0..n.len() as u32),
            Arc::new(
                n.iter()
                    .map(|x| (x.parent != NO_PARENT).then_some(x.parent))
                    .collect::<UInt32Array>(),
            ),
            u32s(n.iter().map(|x| x.tree)),
            Arc::new(n.iter().map(|x| self.group_key(x.tree)).collect::<Int64Array>()),
            u32s(n.iter().map(|x| x.depth)),
            u32s(n.iter().map(|x| x.prompt_len())),
            u32s(n.iter().map(|x| x.action_len)),
            u32s(n.iter().map(|x| x.observation_len())),
            u32s(n.iter().map(|x| x.num_children)),
            Arc::new(n.iter().map(|x| Some(x.leaf.is_some())).collect::<BooleanArray>()),
            reasons(n.iter().map(|x| x.leaf.map(|r| r.as_str())))?,
            Arc::new(n.iter().map(|x| Some(x.kept)).collect::<BooleanArray>()),
            Arc::new(n.iter().map(|x| x.reward).collect::<Float64Array>()),
            stat_u32(&|i| stats.map_or(0, |s| s.kept_below[i])),
            stat_f64(&|i| stats.map_or(f64::NAN, |s| s.value[i])),
            stat_f64(&|i| stats.map_or(f64::NAN, |s| s.advantage_sum[i])),
        ];
        RecordBatch::try_new(nodes_schema(), columns)
    }

    /// Every leaf, kept or not.
    pub fn leaves_batch(&self) -> Result<RecordBatch, ArrowError> {
        let ids: Vec<u32> = (0..self.nodes.len() as u32)
            .filter(|&i| self.nodes[i as usize].leaf.is_some())
            .collect();
        let leaf = |i: &u32| &self.nodes[*i as usize];
        let (mut length, mut action) = (Vec::with_capacity(ids.len()), Vec::with_capacity(ids.len()));
        for &id in &ids {
            let (mut total, mut trained) = (0u32, 0u32);
            let mut cur = id;
            loop {
                let node = &self.nodes[cur as usize];
                total += node.len() as u32;
                trained += node.action_len;
                if node.parent == NO_PARENT {
                    break;
                }
                cur = node.parent;
            }
            length.push(total);
            action.push(trained);
        }
        let columns: Vec<ArrayRef> = vec![
            u32s(ids.iter().copied()),
            u32s(ids.iter().map(|i| leaf(i).tree)),
            Arc::new(
                ids.iter()
                    .map(|i| self.group_key(leaf(i).tree))
                    .collect::<Int64Array>(),
            ),
            u32s(ids.iter().map(|i| leaf(i).depth)),
            reasons(ids.iter().map(|i| leaf(i).leaf.map(|r| r.as_str())))?,
            Arc::new(ids.iter().map(|i| Some(leaf(i).kept)).collect::<BooleanArray>()),
            Arc::new(ids.iter().map(|i| leaf(i).reward).collect::<Float64Array>()),
            u32s(length.into_iter()),
            u32s(action.into_iter()),
        ];
        RecordBatch::try_new(leaves_schema(), columns)
    }

    /// The kept leaves' advantages from the last `advantages` call (empty before one).
    pub fn advantages_batch(&self) -> Result<RecordBatch, ArrowError> {
        let Some(s) = self.last_stats() else {
            return Ok(RecordBatch::new_empty(advantages_schema()));
        };
        let tree = |i: &u32| self.nodes[*i as usize].tree;
        let f64s = |v: &[f64]| -> ArrayRef { Arc::new(Float64Array::from(v.to_vec())) };
        let columns: Vec<ArrayRef> = vec![
            u32s(s.leaves.iter().copied()),
            u32s(s.leaves.iter().map(tree)),
            Arc::new(
                s.leaves
                    .iter()
                    .map(|i| self.group_key(tree(i)))
                    .collect::<Int64Array>(),
            ),
            f64s(&s.reward),
            f64s(&s.a_inter),
            f64s(&s.a_intra),
            f64s(&s.advantage),
        ];
        RecordBatch::try_new(advantages_schema(), columns)
    }
}

#[cfg(test)]
mod tests {
    use crate::advantage::Estimator;
    use crate::forest::tests::small;

    #[test]
    fn tables_follow_their_schemas() {
        let (mut f, _, _, b) = small();
        let nodes = f.nodes_batch().unwrap();
        assert_eq!(nodes.num_rows(), 3);
        assert_eq!(
            nodes.column_by_name("value").unwrap().null_count(),
            3,
            "no statistics before advantages()"
        );
        f.set_rewards(&[b as u64], &[1.0]).unwrap();
        f.advantages(Estimator::Tree, true).unwrap();
        let nodes = f.nodes_batch().unwrap();
        assert_eq!(nodes.column_by_name("value").unwrap().null_count(), 0);
        assert_eq!(nodes.column_by_name("parent").unwrap().null_count(), 1);
        let leaves = f.leaves_batch().unwrap();
        assert_eq!(leaves.num_rows(), 1);
        let adv = f.advantages_batch().unwrap();
        assert_eq!(adv.num_rows(), 1);
    }
}
