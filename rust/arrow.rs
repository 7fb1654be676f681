//! The Arrow schemas of every table treegrpo exports, defined once here
//! (documented in docs/architecture.md), and their builders.

use std::sync::Arc;

use arrow_array::types::Int8Type;
use arrow_array::{
    ArrayRef, BooleanArray, DictionaryArray, Float64Array, Int64Array, Int8Array, RecordBatch, StringArray,
    UInt32Array,
};
use arrow_buffer::{NullBuffer, ScalarBuffer};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef};

use crate::advantage::AdvantageStats;
use crate::forest::{Forest, LeafReason, NO_PARENT};

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
        Field::new("mean_log_prob", DataType::Float64, true),
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

/// Leaf reasons as a dictionary array over the fixed names (no per-row hashing).
fn reasons(values: impl Iterator<Item = Option<LeafReason>>) -> ArrayRef {
    let keys: Int8Array = values.map(|r| r.map(|r| r as i8)).collect();
    let names = StringArray::from(LeafReason::ALL.iter().map(|r| r.as_str()).collect::<Vec<_>>());
    Arc::new(DictionaryArray::<Int8Type>::try_new(keys, Arc::new(names)).expect("keys index the fixed names"))
}

/// A float column, null where the value is NaN (a node without kept leaves has no V).
fn f64s_nan_null(values: ScalarBuffer<f64>) -> ArrayRef {
    let valid = NullBuffer::from_iter(values.iter().map(|v| !v.is_nan()));
    Arc::new(Float64Array::new(values, Some(valid)))
}

impl Forest {
    fn group_key(&self, tree: u32) -> i64 {
        self.groups[self.trees[tree as usize].group as usize].key
    }

    /// Every node, with the per-node statistics of `stats` (null without them, or when they
    /// describe an earlier state of the forest).
    pub fn nodes_batch(&self, stats: Option<&AdvantageStats>) -> Result<RecordBatch, ArrowError> {
        let n = &self.nodes;
        let tree_keys: Vec<i64> = (0..self.trees.len() as u32).map(|t| self.group_key(t)).collect();
        let (kept_leaves, value, advantage_sum): (ArrayRef, ArrayRef, ArrayRef) = match self.current(stats) {
            Some(s) => (
                Arc::new(UInt32Array::new(s.kept_below.clone(), None)),
                f64s_nan_null(s.value.clone()),
                Arc::new(Float64Array::new(s.advantage_sum.clone(), None)),
            ),
            None => (
                arrow_array::new_null_array(&DataType::UInt32, n.len()),
                arrow_array::new_null_array(&DataType::Float64, n.len()),
                arrow_array::new_null_array(&DataType::Float64, n.len()),
            ),
        };
        let columns: Vec<ArrayRef> = vec![
            u32s(0..n.len() as u32),
            Arc::new(
                self.parent
                    .iter()
                    .map(|&p| (p != NO_PARENT).then_some(p))
                    .collect::<UInt32Array>(),
            ),
            Arc::new(UInt32Array::from(self.tree_of.clone())),
            Arc::new(
                self.tree_of
                    .iter()
                    .map(|&t| tree_keys[t as usize])
                    .collect::<Int64Array>(),
            ),
            u32s(n.iter().map(|x| x.depth)),
            u32s(n.iter().map(|x| x.prompt_len())),
            u32s(n.iter().map(|x| x.action_len)),
            u32s(n.iter().map(|x| x.observation_len())),
            u32s(n.iter().map(|x| x.num_children)),
            f64s_nan_null(self.mean_log_prob.clone().into()),
            Arc::new(BooleanArray::from_iter(
                self.leaf.iter().map(|l| Some(l.is_some())),
            )),
            reasons(self.leaf.iter().copied()),
            Arc::new(BooleanArray::from(self.kept.clone())),
            f64s_nan_null(self.reward.clone().into()),
            kept_leaves,
            value,
            advantage_sum,
        ];
        RecordBatch::try_new(nodes_schema(), columns)
    }

    /// Every leaf, kept or not.
    pub fn leaves_batch(&self) -> Result<RecordBatch, ArrowError> {
        let ids = &self.leaf_ids;
        let (mut length, mut action) = (Vec::with_capacity(ids.len()), Vec::with_capacity(ids.len()));
        for &id in ids {
            let (mut total, mut trained) = (0u32, 0u32);
            let mut cur = id;
            while cur != NO_PARENT {
                let node = &self.nodes[cur as usize];
                total += node.len() as u32;
                trained += node.action_len;
                cur = self.parent[cur as usize];
            }
            length.push(total);
            action.push(trained);
        }
        let at = |i: &u32| *i as usize;
        let columns: Vec<ArrayRef> = vec![
            u32s(ids.iter().copied()),
            u32s(ids.iter().map(|i| self.tree_of[at(i)])),
            Arc::new(
                ids.iter()
                    .map(|i| self.group_key(self.tree_of[at(i)]))
                    .collect::<Int64Array>(),
            ),
            u32s(ids.iter().map(|i| self.nodes[at(i)].depth)),
            reasons(ids.iter().map(|i| self.leaf[at(i)])),
            Arc::new(
                ids.iter()
                    .map(|i| Some(self.kept[at(i)]))
                    .collect::<BooleanArray>(),
            ),
            f64s_nan_null(ids.iter().map(|i| self.reward[at(i)]).collect()),
            u32s(length.into_iter()),
            u32s(action.into_iter()),
        ];
        RecordBatch::try_new(leaves_schema(), columns)
    }

    /// The kept leaves' advantages of `stats` (empty without current ones).
    /// The columns share the statistics' buffers: no copy.
    pub fn advantages_batch(&self, stats: Option<&AdvantageStats>) -> Result<RecordBatch, ArrowError> {
        let Some(s) = self.current(stats) else {
            return Ok(RecordBatch::new_empty(advantages_schema()));
        };
        let f64s = |v: &ScalarBuffer<f64>| -> ArrayRef { Arc::new(Float64Array::new(v.clone(), None)) };
        let columns: Vec<ArrayRef> = vec![
            Arc::new(UInt32Array::new(s.leaves.clone(), None)),
            Arc::new(UInt32Array::new(s.tree.clone(), None)),
            Arc::new(Int64Array::new(s.group.clone(), None)),
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
        let nodes = f.nodes_batch(None).unwrap();
        assert_eq!(nodes.num_rows(), 3);
        assert_eq!(
            nodes.column_by_name("value").unwrap().null_count(),
            3,
            "no statistics before advantages()"
        );
        f.set_rewards(&[b as u64], &[1.0]).unwrap();
        let s = f.advantages(Estimator::Tree, true).unwrap();
        let nodes = f.nodes_batch(Some(&s)).unwrap();
        assert_eq!(nodes.column_by_name("value").unwrap().null_count(), 0);
        assert_eq!(nodes.column_by_name("parent").unwrap().null_count(), 1);
        let leaves = f.leaves_batch().unwrap();
        assert_eq!(leaves.num_rows(), 1);
        let adv = f.advantages_batch(Some(&s)).unwrap();
        assert_eq!(adv.num_rows(), 1);
        // any change makes the statistics stale: they read as absent
        f.add_step(0, &[1], &[], None).unwrap();
        assert_eq!(f.advantages_batch(Some(&s)).unwrap().num_rows(), 0);
        assert_eq!(
            f.nodes_batch(Some(&s))
                .unwrap()
                .column_by_name("value")
                .unwrap()
                .null_count(),
            4
        );
    }
}
