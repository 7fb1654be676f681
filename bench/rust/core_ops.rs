//! Rust-side timing of the core operations on a forest of realistic shape (no Python), to see
//! where time goes: `cargo bench --bench core_ops`.

use std::time::Instant;

use treegrpo::{Estimator, Forest, LeafReason, SelectOptions};

fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

/// Groups of 4 trees; each a chain of 2-5 steps to a leaf plus 2 branches from random nodes.
fn forest(target_nodes: usize) -> Forest {
    let mut f = Forest::new();
    let mut s = 7u64;
    let tokens: Vec<u32> = (0..300).collect();
    let mut group = 0;
    while f.nodes.len() < target_nodes {
        for _ in 0..4 {
            let root = f.add_root(group, &tokens[..100]).unwrap();
            let mut open = vec![root];
            let steps = 2 + lcg(&mut s) % 4;
            let mut node = root;
            for k in 0..steps {
                let leaf = (k + 1 == steps).then_some(LeafReason::Answer);
                node = f
                    .add_step(node as u64, &tokens[..150], &tokens[..150], leaf)
                    .unwrap();
                if leaf.is_none() {
                    open.push(node);
                }
                if leaf.is_some() {
                    f.set_rewards(&[node as u64], &[(lcg(&mut s) % 5) as f64 / 4.0])
                        .unwrap();
                }
            }
            for _ in 0..2 {
                let from = open[(lcg(&mut s) % open.len() as u64) as usize];
                let leaf = f
                    .add_step(from as u64, &tokens[..150], &[], Some(LeafReason::Answer))
                    .unwrap();
                f.set_rewards(&[leaf as u64], &[(lcg(&mut s) % 5) as f64 / 4.0])
                    .unwrap();
            }
        }
        group += 1;
    }
    f
}

fn time<T>(name: &str, reps: usize, mut op: impl FnMut() -> T) {
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(op());
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    println!("{name:<28} {:>9.3} ms (median of {reps})", times[reps / 2]);
}

fn main() {
    for size in [100_000, 1_000_000] {
        let f = forest(size);
        println!(
            "{} nodes, {} trees, {} leaves",
            f.nodes.len(),
            f.trees.len(),
            f.num_leaves()
        );
        time("select(2)", 21, || f.select(2, 1, SelectOptions::default()));
        time("advantages(tree)", 21, || {
            f.advantages(Estimator::Tree, true).map(|s| s.leaves.len())
        });
        let stats = f.advantages(Estimator::Tree, true).unwrap();
        time("advantages_batch", 21, || {
            f.advantages_batch(Some(&stats)).unwrap().num_rows()
        });
        time("nodes_batch", 21, || {
            f.nodes_batch(Some(&stats)).unwrap().num_rows()
        });
    }
}
