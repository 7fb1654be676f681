//! The radix prefix index: which token prefixes are cached, SGLang's radix-cache model.
//!
//! # The model
//!
//! A radix tree over `u32` token ids. Every node but the root holds a non-empty key segment and
//! one `u64` value per token (the owner's payload, e.g. a KV block id; stored once per node, as
//! all tokens of a node share it); the children of a node start with distinct tokens. The root is permanent, holds no tokens, and its handle is valid
//! forever.
//!
//! - **Clock.** A logical clock ticks once at the start of every [`RadixIndex::insert`] and
//!   [`RadixIndex::match_prefix`]. Both *touch* the path they walk: every node from the root
//!   down to the node where the operation ends gets `last_access = clock`.
//! - **Split.** When a walk ends (or diverges) inside node X after `k` of its tokens, a new node
//!   P takes X's first `k` tokens and values, X's place under its parent, its lock count and
//!   its last access; X keeps the rest of its key and its identity (so handles to X stay
//!   valid) and becomes P's only child. Every walk therefore ends exactly on a node boundary.
//! - **Insert** appends the part of a sequence that is not stored yet as one new leaf whose
//!   tokens all carry the given value; tokens already stored keep their values.
//! - **Locks.** `inc_lock_ref(h)` adds one to the lock count of h's node and of each of its
//!   ancestors; `dec_lock_ref(h)` takes it back. A node with a lock count above zero is
//!   *protected*, otherwise *evictable*. While every `dec_lock_ref` undoes an earlier
//!   `inc_lock_ref` on the same handle, every ancestor of a protected node is protected.
//! - **Evict** removes, one at a time, the unlocked leaf with the smallest `last_access` (ties
//!   broken by the smaller arena index), until enough tokens were freed or no unlocked leaf is
//!   left; a parent left childless and unlocked becomes a candidate in turn. A value is
//!   *dropped* when the last token carrying it leaves the index: the owner frees its resource.
//!
//! # Handles
//!
//! Nodes live in an arena (`Vec<Node>`, indexed by `u32`) with a free list. A [`Handle`] is
//! `(generation << 32) | index`; freeing a slot bumps its generation, so a handle to an evicted
//! node is reported as [`TreeError::StaleHandle`] even after its slot is reused (until the
//! 32-bit generation of that one slot wraps around, after 2^32 reuses).
//!
//! # Cost
//!
//! `insert`/`match_prefix` walk the sequence once (child lookup by binary search on the first
//! token). Sizes are maintained incrementally, so they are O(1). Unlocked leaves wait in a
//! persistent min-heap keyed by `(last_access, index)` with lazy invalidation: an entry is
//! pushed whenever a node may have become, or been touched as, an unlocked leaf, and skipped at
//! pop time if it no longer describes the node. Evicting k nodes costs O(k log n); the heap is
//! rebuilt when stale entries outnumber the nodes, which keeps its size O(n) at amortized O(1)
//! cost per push.
//!
//! Keys live in a token arena of fixed-capacity chunks, each node holding the position of its
//! key: a split copies no token, an insert appends its new tokens to the current chunk, and
//! growing never moves stored tokens. Large chunks are advised to use huge pages (`memory.rs`):
//! page faults were most of the cost of storing new tokens. Evicted keys leave holes that are
//! compacted away (amortized O(1) per evicted token) once they outnumber the stored tokens.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt::Write as _;

use crate::error::{Result, TreeError};
use crate::memory::huge_vec;

/// A node of the index, as seen from outside: `(generation << 32) | arena index`.
pub type Handle = u64;

/// Arena index of the root (whose generation never changes, so its handle is 0).
const ROOT: u32 = 0;
/// Parent of the root.
const NO_PARENT: u32 = u32::MAX;
/// Keys longer than this are shortened in `pretty_print`.
const PRINT_TOKENS: usize = 8;
/// The token arena is compacted when its dead tokens outnumber both the live ones and this.
const COMPACT_MIN: usize = 1 << 16;
/// Capacity of the token arena's first chunk (4 KiB); each next one doubles, up to `CHUNK`
/// (16 MiB).
const FIRST_CHUNK: usize = 1 << 10;
const CHUNK: usize = 1 << 22;

/// One arena slot.
#[derive(Clone, Debug)]
struct Node {
    /// Where this node's token segment starts in the token arena (`TokenArena::push`).
    start: u64,
    /// Its length (0 for the root and for free slots).
    len: u32,
    /// The value of every token of the key. One per node suffices: an insert adds its new tokens
    /// as one new leaf, and a split gives both halves the value.
    value: u64,
    /// `(first token of the child's key, child index)`, sorted by token.
    children: Vec<(u32, u32)>,
    parent: u32,
    /// How many `inc_lock_ref` calls on this node or a descendant are outstanding.
    lock_ref: u32,
    /// Clock of the last insert/match whose path went through this node.
    last_access: u64,
    /// Bumped each time the slot is freed; part of every handle.
    generation: u32,
    /// False while the slot is on the free list.
    live: bool,
}

impl Node {
    /// A live node whose key is `len` tokens at `start`; `alloc` gives it its slot's generation.
    fn new(start: u64, len: usize, value: u64, parent: u32, lock_ref: u32, last_access: u64) -> Self {
        Node {
            start,
            len: u32::try_from(len).expect("a radix node holds fewer than 2^32 tokens"),
            value,
            children: Vec::new(),
            parent,
            lock_ref,
            last_access,
            generation: 0,
            live: true,
        }
    }

    fn child(&self, token: u32) -> Option<u32> {
        self.children
            .binary_search_by_key(&token, |&(t, _)| t)
            .ok()
            .map(|i| self.children[i].1)
    }
}

/// The keys of every node, in chunks of fixed capacity filled in order.
#[derive(Clone, Debug, Default)]
struct TokenArena {
    chunks: Vec<Vec<u32>>,
    /// Tokens that no live node owns any more (evicted keys).
    dead: usize,
}

impl TokenArena {
    /// Store `key`; returns its position, `(chunk << 32) | offset`. The key goes to the last
    /// chunk if it fits in its spare capacity, else to a new chunk (never reallocated).
    fn push(&mut self, key: &[u32]) -> u64 {
        let fits = self
            .chunks
            .last()
            .is_some_and(|c| c.capacity() - c.len() >= key.len());
        if !fits {
            let last = self.chunks.last().map_or(0, Vec::capacity);
            let capacity = (2 * last).clamp(FIRST_CHUNK, CHUNK).max(key.len());
            self.chunks.push(huge_vec(capacity));
        }
        let index = self.chunks.len() - 1;
        let chunk = &mut self.chunks[index];
        let offset = chunk.len();
        chunk.extend_from_slice(key);
        ((index as u64) << 32) | offset as u64
    }

    /// The `len` tokens at `start` (none for the root and free slots, whose `start` may name
    /// no chunk). A key never crosses a chunk, and the offset of any of its tokens fits in
    /// 32 bits, so `start + k` is the position of its token k.
    fn get(&self, start: u64, len: u32) -> &[u32] {
        if len == 0 {
            return &[];
        }
        let offset = (start & u64::from(u32::MAX)) as usize;
        &self.chunks[(start >> 32) as usize][offset..offset + len as usize]
    }
}

/// The result of [`RadixIndex::match_prefix`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefixMatch {
    /// How many leading tokens of the query are stored.
    pub len: usize,
    /// The node that ends exactly after those `len` tokens (the root when `len == 0`).
    pub handle: Handle,
    /// The value of the last matched token; `None` when `len == 0`.
    pub value: Option<u64>,
}

/// The result of [`RadixIndex::evict`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Eviction {
    /// Tokens removed (at least the requested number unless nothing evictable was left).
    pub freed: usize,
    /// Values whose last token left the index during this call, in the order they left.
    pub dropped: Vec<u64>,
}

/// A radix tree of cached token sequences with SGLang's insert / match / lock / LRU-evict verbs.
/// See the module documentation for the model.
#[derive(Clone, Debug)]
pub struct RadixIndex {
    nodes: Vec<Node>,
    /// Every node's key.
    tokens: TokenArena,
    /// Free arena slots (their generation already bumped).
    free: Vec<u32>,
    clock: u64,
    /// Tokens stored.
    total: usize,
    /// Tokens in nodes whose lock count is above zero.
    protected: usize,
    /// Live nodes other than the root.
    num_nodes: usize,
    /// Tokens stored per value, to tell when a value's last token leaves.
    value_tokens: HashMap<u64, usize>,
    /// Candidate leaves `(last_access, index, generation)`, min first; may hold stale entries.
    heap: BinaryHeap<Reverse<(u64, u32, u32)>>,
}

impl Default for RadixIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl RadixIndex {
    /// The handle of the root, valid forever; lock operations on it do nothing.
    pub const ROOT: Handle = ROOT as Handle;

    /// An empty index (just the root).
    pub fn new() -> Self {
        RadixIndex {
            nodes: vec![Node::new(0, 0, 0, NO_PARENT, 0, 0)],
            tokens: TokenArena::default(),
            free: Vec::new(),
            clock: 0,
            total: 0,
            protected: 0,
            num_nodes: 0,
            value_tokens: HashMap::new(),
            heap: BinaryHeap::new(),
        }
    }

    /// Tokens stored.
    pub fn total_size(&self) -> usize {
        self.total
    }

    /// Tokens in unlocked nodes (all of which `evict` can free while locks are balanced).
    pub fn evictable_size(&self) -> usize {
        self.total - self.protected
    }

    /// Tokens in locked nodes; `evictable_size() + protected_size() == total_size()`.
    pub fn protected_size(&self) -> usize {
        self.protected
    }

    /// Nodes holding tokens (the root is not counted).
    pub fn num_nodes(&self) -> usize {
        self.num_nodes
    }

    /// The logical clock: the number of `insert`/`match_prefix` calls so far.
    pub fn clock(&self) -> u64 {
        self.clock
    }

    /// Store `tokens`, giving every token not stored yet the value `value`; tokens already stored
    /// keep theirs. Returns how many leading tokens were already stored. Touches the path down to
    /// the node where `tokens` ends (splitting a node so that one ends exactly there).
    pub fn insert(&mut self, tokens: &[u32], value: u64) -> usize {
        self.clock += 1;
        if tokens.is_empty() {
            return 0;
        }
        let (matched, node) = self.walk(tokens);
        if matched < tokens.len() {
            let leaf = self.add_leaf(node, &tokens[matched..], value);
            self.offer(leaf);
        } else {
            self.offer(node);
        }
        matched
    }

    /// The longest stored prefix of `tokens`: its length, the handle of the node that ends
    /// exactly there (splitting one if the prefix ends inside it) and the last token's value.
    /// Touches the path; never adds or removes tokens.
    pub fn match_prefix(&mut self, tokens: &[u32]) -> PrefixMatch {
        self.clock += 1;
        let (len, node) = self.walk(tokens);
        self.offer(node);
        let n = &self.nodes[node as usize];
        PrefixMatch {
            len,
            handle: handle(node, n.generation),
            value: (node != ROOT).then_some(n.value),
        }
    }

    /// Protect `handle`'s node and its ancestors from eviction (lock count + 1 on each).
    /// Returns how many tokens became protected. A no-op on the root.
    pub fn inc_lock_ref(&mut self, handle: Handle) -> Result<usize> {
        let target = self.resolve(handle)?;
        if self
            .path_up(target)
            .any(|i| self.nodes[i as usize].lock_ref == u32::MAX)
        {
            return Err(TreeError::InvalidArgument(format!(
                "inc_lock_ref on radix node {handle}: a lock count on its path is at its maximum (2^32 - 1)"
            )));
        }
        let mut newly = 0;
        let mut i = target;
        while i != ROOT {
            let n = &mut self.nodes[i as usize];
            if n.lock_ref == 0 {
                newly += n.len as usize;
            }
            n.lock_ref += 1;
            i = n.parent;
        }
        self.protected += newly;
        Ok(newly)
    }

    /// Undo one `inc_lock_ref(handle)`. Returns how many tokens became evictable. Fails with
    /// `LockUnderflow`, changing nothing, if a node on the path is not locked. A no-op on the root.
    pub fn dec_lock_ref(&mut self, handle: Handle) -> Result<usize> {
        let target = self.resolve(handle)?;
        if self.path_up(target).any(|i| self.nodes[i as usize].lock_ref == 0) {
            return Err(TreeError::LockUnderflow { handle });
        }
        let mut released = 0;
        let mut i = target;
        while i != ROOT {
            let n = &mut self.nodes[i as usize];
            n.lock_ref -= 1;
            if n.lock_ref == 0 {
                released += n.len as usize;
            }
            i = n.parent;
        }
        self.protected -= released;
        // Only `target` can be a leaf: every other node of the path has a child.
        self.offer(target);
        Ok(released)
    }

    /// Remove least-recently-used unlocked leaves until at least `n_tokens` tokens were freed or
    /// none is left. Handles to removed nodes become stale.
    pub fn evict(&mut self, n_tokens: usize) -> Eviction {
        let mut out = Eviction::default();
        while out.freed < n_tokens {
            let Some(Reverse((access, index, generation))) = self.heap.pop() else {
                break;
            };
            // Skip entries that no longer describe the node: it was evicted (the generation
            // moved), touched since (the access moved), locked, or given a child.
            let n = &self.nodes[index as usize];
            if n.generation == generation && n.last_access == access && self.is_candidate(index) {
                out.freed += self.remove_leaf(index, &mut out.dropped);
            }
        }
        if self.tokens.dead > self.total.max(COMPACT_MIN) {
            self.compact();
        }
        out
    }

    /// Drop every node (all handles but the root's become stale). The clock keeps running.
    pub fn reset(&mut self) {
        for index in 1..self.nodes.len() as u32 {
            if self.nodes[index as usize].live {
                self.release(index);
            }
        }
        self.nodes[ROOT as usize].children.clear();
        self.tokens = TokenArena::default();
        self.total = 0;
        self.protected = 0;
        self.num_nodes = 0;
        self.value_tokens.clear();
        self.heap.clear();
    }

    /// Every stored sequence that ends at a leaf (so every stored token lies on one of them),
    /// sorted. Read-only.
    pub fn sequences(&self) -> Vec<Vec<u32>> {
        let mut out = Vec::new();
        // (node, length of the path above it)
        let mut stack = vec![(ROOT, 0usize)];
        let mut path: Vec<u32> = Vec::new();
        while let Some((i, depth)) = stack.pop() {
            let n = &self.nodes[i as usize];
            path.truncate(depth);
            path.extend_from_slice(self.key(i));
            if n.children.is_empty() {
                if i != ROOT {
                    out.push(path.clone());
                }
            } else {
                stack.extend(n.children.iter().rev().map(|&(_, c)| (c, path.len())));
            }
        }
        out
    }

    /// An indented dump, one node per line (children in token order) with its tokens
    /// (long keys shortened), lock count, last access and handle.
    pub fn pretty_print(&self) -> String {
        let mut out = format!(
            "RadixIndex(tokens={}, nodes={}, protected={}) clock={}\n",
            self.total, self.num_nodes, self.protected, self.clock
        );
        let mut stack: Vec<(u32, usize)> = self.nodes[ROOT as usize]
            .children
            .iter()
            .rev()
            .map(|&(_, c)| (c, 1))
            .collect();
        while let Some((i, depth)) = stack.pop() {
            let n = &self.nodes[i as usize];
            let key = self.key(i);
            let shown: Vec<String> = key.iter().take(PRINT_TOKENS).map(u32::to_string).collect();
            let more = match key.len().saturating_sub(PRINT_TOKENS) {
                0 => String::new(),
                extra => format!(" …(+{extra})"),
            };
            let _ = writeln!(
                out,
                "{:indent$}[{}{more}] lock={} access={} handle={}",
                "",
                shown.join(" "),
                n.lock_ref,
                n.last_access,
                handle(i, n.generation),
                indent = 2 * (depth - 1),
            );
            stack.extend(n.children.iter().rev().map(|&(_, c)| (c, depth + 1)));
        }
        out
    }

    // ---- internals ----

    /// The tokens of node `index`.
    fn key(&self, index: u32) -> &[u32] {
        let n = &self.nodes[index as usize];
        self.tokens.get(n.start, n.len)
    }

    /// Rewrite the token arena with the live keys only (in node order), dropping evicted ones.
    fn compact(&mut self) {
        let old = std::mem::take(&mut self.tokens);
        for n in self.nodes.iter_mut().filter(|n| n.live && n.len > 0) {
            n.start = self.tokens.push(old.get(n.start, n.len));
        }
    }

    /// The arena index of a live node, or `StaleHandle`.
    fn resolve(&self, handle: Handle) -> Result<u32> {
        let index = (handle & u64::from(u32::MAX)) as u32;
        let generation = (handle >> 32) as u32;
        match self.nodes.get(index as usize) {
            Some(n) if n.live && n.generation == generation => Ok(index),
            _ => Err(TreeError::StaleHandle { handle }),
        }
    }

    /// `index` and its ancestors, the root excluded.
    fn path_up(&self, index: u32) -> impl Iterator<Item = u32> + '_ {
        std::iter::successors(Some(index), |&i| Some(self.nodes[i as usize].parent))
            .take_while(|&i| i != ROOT)
    }

    /// Follow `tokens` down from the root, splitting the last node if the match ends inside it and
    /// touching every node on the way. Returns (tokens matched, node ending exactly there).
    fn walk(&mut self, tokens: &[u32]) -> (usize, u32) {
        let now = self.clock;
        self.nodes[ROOT as usize].last_access = now;
        let (mut matched, mut node) = (0, ROOT);
        while matched < tokens.len() {
            let Some(child) = self.nodes[node as usize].child(tokens[matched]) else {
                break;
            };
            let key = self.key(child);
            let common = common_prefix(key, &tokens[matched..]);
            let whole = common == key.len();
            node = if whole { child } else { self.split(child, common) };
            self.nodes[node as usize].last_access = now;
            matched += common;
            if !whole {
                // The match ended or diverged inside `child`: the new node's only child is the
                // rest of `child`, which does not continue `tokens`.
                break;
            }
        }
        (matched, node)
    }

    /// Split node `x` after `at` tokens (0 < at < key length); returns the new upper node.
    fn split(&mut self, x: u32, at: usize) -> u32 {
        let n = &mut self.nodes[x as usize];
        debug_assert!(at > 0 && at < n.len as usize);
        // The upper node takes the key's first `at` tokens, `x` keeps the rest: no token moves.
        let head_start = n.start;
        n.start += at as u64;
        n.len -= at as u32;
        let (value, parent, lock_ref, last_access) = (n.value, n.parent, n.lock_ref, n.last_access);
        let (head_first, first) = (self.tokens.get(head_start, 1)[0], self.key(x)[0]);
        let p = self.alloc(Node::new(head_start, at, value, parent, lock_ref, last_access));
        self.nodes[p as usize].children.push((first, x));
        self.nodes[x as usize].parent = p;
        let siblings = &mut self.nodes[parent as usize].children;
        let slot = siblings
            .binary_search_by_key(&head_first, |&(t, _)| t)
            .expect("a node is listed under its parent");
        siblings[slot].1 = p;
        p
    }

    /// A new unlocked leaf under `parent` holding `key`, every token with `value`, touched now.
    fn add_leaf(&mut self, parent: u32, key: &[u32], value: u64) -> u32 {
        let (len, first, start) = (key.len(), key[0], self.tokens.push(key));
        let leaf = self.alloc(Node::new(start, len, value, parent, 0, self.clock));
        let siblings = &mut self.nodes[parent as usize].children;
        let slot = siblings
            .binary_search_by_key(&first, |&(t, _)| t)
            .expect_err("the walk stopped because no child starts with this token");
        siblings.insert(slot, (first, leaf));
        self.total += len;
        *self.value_tokens.entry(value).or_insert(0) += len;
        leaf
    }

    /// Put `node` into an arena slot (reusing a free one with its generation) and return its index.
    fn alloc(&mut self, mut node: Node) -> u32 {
        self.num_nodes += 1;
        if let Some(index) = self.free.pop() {
            node.generation = self.nodes[index as usize].generation;
            self.nodes[index as usize] = node;
            index
        } else {
            let index = u32::try_from(self.nodes.len())
                .ok()
                .filter(|&i| i != NO_PARENT)
                .expect("a radix index holds fewer than 2^32 - 1 nodes");
            self.nodes.push(node);
            index
        }
    }

    /// Free slot `index`: bump its generation and put it on the free list.
    fn release(&mut self, index: u32) {
        let n = &mut self.nodes[index as usize];
        n.live = false;
        n.generation = n.generation.wrapping_add(1);
        n.len = 0;
        n.children = Vec::new();
        n.parent = NO_PARENT;
        n.lock_ref = 0;
        self.free.push(index);
        self.num_nodes -= 1;
    }

    /// Whether `index` is a live, unlocked leaf other than the root.
    fn is_candidate(&self, index: u32) -> bool {
        let n = &self.nodes[index as usize];
        index != ROOT && n.live && n.lock_ref == 0 && n.children.is_empty()
    }

    /// Queue `index` for eviction if it is an unlocked leaf (with its current last access).
    fn offer(&mut self, index: u32) {
        if !self.is_candidate(index) {
            return;
        }
        if self.heap.len() > 2 * self.num_nodes + 32 {
            // Mostly stale entries: rebuild from the arena.
            let fresh: Vec<_> = (1..self.nodes.len() as u32)
                .filter(|&i| self.is_candidate(i))
                .map(|i| {
                    Reverse((
                        self.nodes[i as usize].last_access,
                        i,
                        self.nodes[i as usize].generation,
                    ))
                })
                .collect();
            self.heap = BinaryHeap::from(fresh);
            return; // `index` is among them
        }
        let n = &self.nodes[index as usize];
        self.heap.push(Reverse((n.last_access, index, n.generation)));
    }

    /// Remove the unlocked leaf `index`; returns its token count and appends dropped values.
    fn remove_leaf(&mut self, index: u32, dropped: &mut Vec<u64>) -> usize {
        let n = &self.nodes[index as usize];
        let (parent, first, len) = (n.parent, self.key(index)[0], n.len as usize);
        let count = self
            .value_tokens
            .get_mut(&n.value)
            .expect("every stored value is counted");
        *count -= len;
        if *count == 0 {
            self.value_tokens.remove(&n.value);
            dropped.push(n.value);
        }
        let siblings = &mut self.nodes[parent as usize].children;
        let slot = siblings
            .binary_search_by_key(&first, |&(t, _)| t)
            .expect("a node is listed under its parent");
        siblings.remove(slot);
        self.total -= len;
        self.tokens.dead += len;
        self.release(index);
        self.offer(parent);
        len
    }
}

/// Length of the common prefix of `a` and `b`. A walk passes through whole nodes, so first the
/// whole overlap is compared at once (`memcmp`); if it differs, 16-token blocks are compared by
/// or-ing their xors (vectorised, inline), then tokens inside the first differing block.
fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    const BLOCK: usize = 16;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    if a == b {
        return n;
    }
    let mut i = 0;
    for (x, y) in a.chunks_exact(BLOCK).zip(b.chunks_exact(BLOCK)) {
        if x.iter().zip(y).fold(0, |diff, (p, q)| diff | (p ^ q)) != 0 {
            break;
        }
        i += BLOCK;
    }
    i + a[i..].iter().zip(&b[i..]).take_while(|(x, y)| x == y).count()
}

fn handle(index: u32, generation: u32) -> Handle {
    (u64::from(generation) << 32) | u64::from(index)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_prefix_matches_a_token_loop() {
        let a: Vec<u32> = (0..100).collect();
        for cut in [0, 1, 15, 16, 17, 31, 32, 64, 99, 100] {
            let mut b = a.clone();
            if cut < b.len() {
                b[cut] = 1000;
            }
            assert_eq!(common_prefix(&a, &b), cut);
            assert_eq!(common_prefix(&a[..cut.min(40)], &b), cut.min(40));
        }
    }

    /// Sizes and structure agree with a recount from scratch.
    fn check(ix: &RadixIndex) {
        let live: Vec<u32> = (1..ix.nodes.len() as u32)
            .filter(|&i| ix.nodes[i as usize].live)
            .collect();
        assert_eq!(live.len(), ix.num_nodes());
        let total: usize = live.iter().map(|&i| ix.key(i).len()).sum();
        let protected: usize = live
            .iter()
            .filter(|&&i| ix.nodes[i as usize].lock_ref > 0)
            .map(|&i| ix.key(i).len())
            .sum();
        assert_eq!((ix.total_size(), ix.protected_size()), (total, protected));
        let stored: usize = ix.tokens.chunks.iter().map(Vec::len).sum();
        assert_eq!(
            stored,
            total + ix.tokens.dead,
            "every arena token is live or dead"
        );
        assert_eq!(ix.evictable_size(), total - protected);
        for &i in &live {
            let n = &ix.nodes[i as usize];
            assert!(!ix.key(i).is_empty());
            let p = &ix.nodes[n.parent as usize];
            assert!(p.live && p.child(ix.key(i)[0]) == Some(i));
        }
        let mut counts: HashMap<u64, usize> = HashMap::new();
        for &i in &live {
            let n = &ix.nodes[i as usize];
            *counts.entry(n.value).or_default() += ix.key(i).len();
        }
        assert_eq!(counts, ix.value_tokens);
        // Every unlocked leaf waits in the heap with its current access time.
        for &i in live.iter().filter(|&&i| ix.is_candidate(i)) {
            let n = &ix.nodes[i as usize];
            assert!(
                ix.heap.iter().any(|e| e.0 == (n.last_access, i, n.generation)),
                "leaf {i} is queued"
            );
        }
    }

    /// Keys of the root's subtree, depth-first in token order, as (depth, key) pairs.
    fn shape(ix: &RadixIndex) -> Vec<(usize, Vec<u32>)> {
        let mut out = Vec::new();
        let mut stack = vec![(ROOT, 0)];
        while let Some((i, d)) = stack.pop() {
            let n = &ix.nodes[i as usize];
            if i != ROOT {
                out.push((d, ix.key(i).to_vec()));
            }
            stack.extend(n.children.iter().rev().map(|&(_, c)| (c, d + 1)));
        }
        out
    }

    fn access(ix: &RadixIndex, h: Handle) -> u64 {
        ix.nodes[ix.resolve(h).unwrap() as usize].last_access
    }

    #[test]
    fn insert_returns_the_cached_prefix_and_keeps_old_values() {
        let mut ix = RadixIndex::new();
        assert_eq!(ix.insert(&[], 9), 0);
        assert_eq!(ix.insert(&[1, 2, 3, 4], 10), 0);
        assert_eq!(ix.insert(&[1, 2, 3, 4], 11), 4);
        assert_eq!(ix.insert(&[1, 2, 5], 12), 2);
        assert_eq!(ix.insert(&[1, 2, 3, 4, 6, 7], 13), 4);
        assert_eq!(ix.insert(&[2], 14), 0);
        assert_eq!(ix.clock(), 6, "every insert ticks the clock, even an empty one");
        assert_eq!(ix.total_size(), 4 + 1 + 2 + 1);
        assert_eq!(
            shape(&ix),
            vec![
                (1, vec![1, 2]),
                (2, vec![3, 4]),
                (3, vec![6, 7]),
                (2, vec![5]),
                (1, vec![2]),
            ]
        );
        assert_eq!(
            ix.match_prefix(&[1, 2, 3, 9]).value,
            Some(10),
            "the first insert's value stays"
        );
        assert_eq!(ix.match_prefix(&[1, 2, 5]).value, Some(12));
        assert_eq!(ix.match_prefix(&[1, 2, 3, 4, 6]).value, Some(13));
        check(&ix);
    }

    #[test]
    fn insert_ending_inside_a_node_splits_it() {
        let mut ix = RadixIndex::new();
        ix.insert(&[1, 2, 3, 4], 7);
        let m = ix.match_prefix(&[1, 2, 3, 4]);
        assert_eq!(ix.insert(&[1, 2], 8), 2);
        assert_eq!(shape(&ix), vec![(1, vec![1, 2]), (2, vec![3, 4])]);
        assert_eq!(ix.num_nodes(), 2);
        // The lower part kept its identity.
        assert_eq!(ix.match_prefix(&[1, 2, 3, 4]).handle, m.handle);
        check(&ix);
    }

    #[test]
    fn match_splits_and_the_old_handle_keeps_the_lower_part() {
        let mut ix = RadixIndex::new();
        ix.insert(&[1, 2, 3, 4, 5], 7);
        let whole = ix.match_prefix(&[1, 2, 3, 4, 5]);
        assert_eq!((whole.len, whole.value), (5, Some(7)));
        ix.inc_lock_ref(whole.handle).unwrap();

        let m = ix.match_prefix(&[1, 2, 3, 9, 9]);
        assert_eq!((m.len, m.value), (3, Some(7)));
        assert_ne!(m.handle, whole.handle);
        assert_eq!(shape(&ix), vec![(1, vec![1, 2, 3]), (2, vec![4, 5])]);
        // The new upper node inherited the lock; the sizes did not move.
        assert_eq!(ix.nodes[ix.resolve(m.handle).unwrap() as usize].lock_ref, 1);
        assert_eq!((ix.total_size(), ix.protected_size()), (5, 5));
        // A match ending exactly at a boundary does not split again.
        assert_eq!(ix.match_prefix(&[1, 2, 3]).handle, m.handle);
        assert_eq!(ix.match_prefix(&[1, 2, 3, 4, 5, 6]).handle, whole.handle);
        assert_eq!(ix.num_nodes(), 2);
        // Unlocking through the old handle unlocks the new upper node too.
        assert_eq!(ix.dec_lock_ref(whole.handle).unwrap(), 5);
        assert_eq!(ix.protected_size(), 0);
        check(&ix);
    }

    #[test]
    fn empty_and_missing_matches_return_the_root() {
        let mut ix = RadixIndex::new();
        let m = ix.match_prefix(&[]);
        assert_eq!(
            m,
            PrefixMatch {
                len: 0,
                handle: RadixIndex::ROOT,
                value: None
            }
        );
        ix.insert(&[1, 2], 3);
        assert_eq!(
            ix.match_prefix(&[2, 1]),
            PrefixMatch {
                len: 0,
                handle: RadixIndex::ROOT,
                value: None
            }
        );
        assert_eq!(ix.inc_lock_ref(RadixIndex::ROOT), Ok(0));
        assert_eq!(ix.dec_lock_ref(RadixIndex::ROOT), Ok(0));
        assert_eq!(
            ix.dec_lock_ref(RadixIndex::ROOT),
            Ok(0),
            "root lock ops are no-ops, never underflow"
        );
        assert_eq!(ix.protected_size(), 0);
    }

    #[test]
    fn touch_sets_the_clock_on_the_whole_path() {
        let mut ix = RadixIndex::new();
        ix.insert(&[1, 2], 0); // clock 1
        ix.insert(&[1, 2, 3], 0); // clock 2
        ix.insert(&[1, 2, 4], 0); // clock 3
        let a = ix.match_prefix(&[1, 2]).handle; // clock 4
        let b = ix.match_prefix(&[1, 2, 3]).handle; // clock 5
        let c = ix.match_prefix(&[1, 2, 4]).handle; // clock 6
        assert_eq!((access(&ix, a), access(&ix, b), access(&ix, c)), (6, 5, 6));
        ix.match_prefix(&[1]); // clock 7: splits [1, 2]; the new [1] is touched, [2] keeps 6
        assert_eq!(access(&ix, a), 6);
        let one = ix.match_prefix(&[1]).handle; // clock 8
        assert_eq!(access(&ix, one), 8);
    }

    #[test]
    fn evicts_least_recently_used_leaves_first() {
        let mut ix = RadixIndex::new();
        ix.insert(&[1, 1, 1], 1); // clock 1
        ix.insert(&[2, 2], 2); // clock 2
        ix.insert(&[3], 3); // clock 3
        ix.match_prefix(&[1, 1]); // clock 4: splits [1 1 1]; [1 1] touched, [1] keeps clock 1
        assert_eq!(
            shape(&ix),
            vec![(1, vec![1, 1]), (2, vec![1]), (1, vec![2, 2]), (1, vec![3])]
        );

        // LRU leaf: the lower [1] (clock 1), then [2 2] (clock 2).
        assert_eq!(
            ix.evict(2),
            Eviction {
                freed: 3,
                dropped: vec![2]
            }
        );
        assert_eq!(ix.sequences(), vec![vec![1, 1], vec![3]]);
        // [1 1] became a leaf with clock 4, after [3] (clock 3).
        assert_eq!(
            ix.evict(1),
            Eviction {
                freed: 1,
                dropped: vec![3]
            }
        );
        assert_eq!(ix.evict(0), Eviction::default());
        assert_eq!(
            ix.evict(100),
            Eviction {
                freed: 2,
                dropped: vec![1]
            }
        );
        assert_eq!((ix.total_size(), ix.num_nodes()), (0, 0));
        assert_eq!(ix.evict(1), Eviction::default());
        check(&ix);
    }

    #[test]
    fn a_parent_left_childless_competes_by_its_own_access_time() {
        let mut ix = RadixIndex::new();
        ix.insert(&[1, 2, 3], 1); // clock 1
        ix.insert(&[1, 2, 4], 2); // clock 2: [1 2] -> {[3], [4]}
        ix.insert(&[5], 3); // clock 3
        ix.match_prefix(&[1, 2]); // clock 4: [1 2] is now newer than [5]
                                  // [3] (1), [4] (2), then [5] (3) before [1 2] (4).
        assert_eq!(
            ix.evict(3),
            Eviction {
                freed: 3,
                dropped: vec![2, 3]
            }
        );
        assert_eq!(ix.sequences(), vec![vec![1, 2]]);
        assert_eq!(ix.match_prefix(&[1, 2, 3]).value, Some(1));
        check(&ix);
    }

    #[test]
    fn locks_protect_paths_from_eviction() {
        let mut ix = RadixIndex::new();
        ix.insert(&[1, 2, 3], 1);
        ix.insert(&[1, 2, 4], 2);
        ix.insert(&[9], 9);
        let h = ix.match_prefix(&[1, 2, 3]).handle;
        assert_eq!(ix.inc_lock_ref(h), Ok(3), "[1 2] and [3] become protected");
        assert_eq!(ix.inc_lock_ref(h), Ok(0), "already protected");
        assert_eq!((ix.protected_size(), ix.evictable_size()), (3, 2));
        assert_eq!(
            ix.evict(100),
            Eviction {
                freed: 2,
                dropped: vec![2, 9]
            }
        );
        assert_eq!(ix.sequences(), vec![vec![1, 2, 3]]);
        assert_eq!(ix.dec_lock_ref(h), Ok(0));
        assert_eq!(ix.evict(100), Eviction::default(), "still locked once");
        assert_eq!(ix.dec_lock_ref(h), Ok(3));
        assert_eq!(
            ix.evict(1),
            Eviction {
                freed: 1,
                dropped: vec![]
            }
        );
        assert_eq!(
            ix.evict(1),
            Eviction {
                freed: 2,
                dropped: vec![1]
            }
        );
        check(&ix);
    }

    #[test]
    fn a_locked_child_keeps_an_unlocked_sibling_evictable() {
        let mut ix = RadixIndex::new();
        ix.insert(&[1, 2], 1);
        ix.insert(&[1, 3], 2);
        let h = ix.match_prefix(&[1, 2]).handle;
        ix.inc_lock_ref(h).unwrap();
        assert_eq!(
            ix.evict(10),
            Eviction {
                freed: 1,
                dropped: vec![2]
            }
        );
        assert_eq!(ix.sequences(), vec![vec![1, 2]]);
        check(&ix);
    }

    #[test]
    fn errors_leave_the_index_unchanged() {
        let mut ix = RadixIndex::new();
        ix.insert(&[1, 2, 3], 1);
        ix.insert(&[1, 2, 4], 2);
        let lower = ix.match_prefix(&[1, 2, 3]).handle;
        let upper = ix.match_prefix(&[1, 2]).handle;
        ix.inc_lock_ref(lower).unwrap();
        ix.dec_lock_ref(lower).unwrap();
        ix.inc_lock_ref(upper).unwrap();
        let before = (ix.pretty_print(), ix.protected_size(), ix.clock());
        // [1 2] is locked, [3] is not: the whole dec must be refused.
        assert_eq!(
            ix.dec_lock_ref(lower),
            Err(TreeError::LockUnderflow { handle: lower })
        );
        assert_eq!((ix.pretty_print(), ix.protected_size(), ix.clock()), before);

        let bogus = [lower + (1 << 32), 999, u64::MAX];
        for h in bogus {
            assert_eq!(ix.inc_lock_ref(h), Err(TreeError::StaleHandle { handle: h }));
            assert_eq!(ix.dec_lock_ref(h), Err(TreeError::StaleHandle { handle: h }));
        }
        assert_eq!((ix.pretty_print(), ix.protected_size(), ix.clock()), before);
        check(&ix);
    }

    #[test]
    fn evicted_handles_go_stale_even_when_their_slot_is_reused() {
        let mut ix = RadixIndex::new();
        ix.insert(&[1, 2], 1);
        let old = ix.match_prefix(&[1, 2]).handle;
        assert_eq!(ix.evict(1).freed, 2);
        assert_eq!(ix.inc_lock_ref(old), Err(TreeError::StaleHandle { handle: old }));
        ix.insert(&[1, 2], 1);
        let new = ix.match_prefix(&[1, 2]).handle;
        assert_eq!(new & 0xffff_ffff, old & 0xffff_ffff, "the slot was reused");
        assert_ne!(new, old);
        assert_eq!(ix.inc_lock_ref(old), Err(TreeError::StaleHandle { handle: old }));
        assert_eq!(ix.inc_lock_ref(new), Ok(2));
    }

    #[test]
    fn dropped_values_are_reported_when_their_last_token_leaves() {
        let mut ix = RadixIndex::new();
        ix.insert(&[1, 2, 3], 7); // clock 1
        ix.insert(&[4], 7); // clock 2
        ix.insert(&[1, 2, 3, 5], 8); // clock 3: [1 2 3] -> [5]
        ix.insert(&[6], 9); // clock 4
                            // [4] (7, but [1 2 3] still holds 7), then [5] (8 gone), then [1 2 3] (7 gone), then [6].
        assert_eq!(
            ix.evict(1),
            Eviction {
                freed: 1,
                dropped: vec![]
            }
        );
        assert_eq!(
            ix.evict(1),
            Eviction {
                freed: 1,
                dropped: vec![8]
            }
        );
        assert_eq!(
            ix.evict(4),
            Eviction {
                freed: 4,
                dropped: vec![7, 9]
            }
        );
        assert!(ix.value_tokens.is_empty());
    }

    #[test]
    fn reset_drops_everything_and_stales_handles() {
        let mut ix = RadixIndex::new();
        ix.insert(&[1, 2], 1);
        let h = ix.match_prefix(&[1, 2]).handle;
        ix.inc_lock_ref(h).unwrap();
        ix.reset();
        assert_eq!((ix.total_size(), ix.protected_size(), ix.num_nodes()), (0, 0, 0));
        assert_eq!(ix.inc_lock_ref(h), Err(TreeError::StaleHandle { handle: h }));
        assert_eq!(ix.match_prefix(&[1, 2]).len, 0);
        assert!(ix.sequences().is_empty());
        assert_eq!(ix.insert(&[1, 2], 3), 0);
        assert_eq!(
            ix.evict(5),
            Eviction {
                freed: 2,
                dropped: vec![3]
            }
        );
        check(&ix);
    }

    #[test]
    fn pretty_print_shortens_long_keys() {
        let mut ix = RadixIndex::new();
        ix.insert(&(0..20).collect::<Vec<u32>>(), 1);
        ix.insert(&[0, 1, 99], 2);
        let text = ix.pretty_print();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + ix.num_nodes());
        assert!(lines[0].starts_with("RadixIndex(tokens=21, nodes=3, protected=0)"));
        assert!(lines[1].starts_with("[0 1] lock=0 access=2"), "{text}");
        assert!(
            lines[2].starts_with("  [2 3 4 5 6 7 8 9 …(+10)] lock=0 access=1"),
            "{text}"
        );
        assert!(lines[3].starts_with("  [99] lock=0 access=2"), "{text}");
    }

    #[test]
    fn stale_heap_entries_are_compacted() {
        let mut ix = RadixIndex::new();
        ix.insert(&[1], 1);
        ix.insert(&[2], 2);
        for _ in 0..1000 {
            ix.match_prefix(&[1]);
        }
        assert!(ix.heap.len() <= 2 * ix.num_nodes() + 33);
        assert_eq!(
            ix.evict(1),
            Eviction {
                freed: 1,
                dropped: vec![2]
            }
        );
        assert_eq!(
            ix.evict(1),
            Eviction {
                freed: 1,
                dropped: vec![1]
            }
        );
    }

    #[test]
    fn evicted_keys_are_compacted_away() {
        let mut ix = RadixIndex::new();
        let seq = |i: u32| -> Vec<u32> { (0..4096).map(|k| i * 10_000 + k).collect() };
        for i in 0..40 {
            ix.insert(&seq(i), u64::from(i));
        }
        // Split the oldest two so live keys sit on both sides of the holes.
        ix.match_prefix(&seq(0)[..100]);
        let keep = ix.match_prefix(&seq(1)).handle;
        ix.inc_lock_ref(keep).unwrap();
        let e = ix.evict(usize::MAX);
        assert_eq!(e.freed, 39 * 4096);
        let stored: usize = ix.tokens.chunks.iter().map(Vec::len).sum();
        assert_eq!((stored, ix.tokens.dead), (4096, 0), "compacted");
        assert_eq!(ix.sequences(), vec![seq(1)]);
        assert_eq!(ix.match_prefix(&seq(1)).handle, keep);
        assert_eq!(ix.insert(&seq(2), 2), 0);
        assert_eq!(ix.sequences(), vec![seq(1), seq(2)]);
        check(&ix);
    }

    /// A small deterministic random walk checked against the invariants after every step.
    #[test]
    fn random_operations_keep_the_invariants() {
        let mut ix = RadixIndex::new();
        let mut handles = vec![RadixIndex::ROOT];
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |m: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % m
        };
        for _ in 0..5000 {
            let len = next(7) as usize;
            let tokens: Vec<u32> = (0..len).map(|_| next(3) as u32).collect();
            match next(6) {
                0 | 1 => {
                    let cached = ix.insert(&tokens, next(4));
                    assert!(cached <= tokens.len());
                }
                2 => handles.push(ix.match_prefix(&tokens).handle),
                3 => {
                    let h = handles[next(handles.len() as u64) as usize];
                    let _ = ix.inc_lock_ref(h);
                }
                4 => {
                    let h = handles[next(handles.len() as u64) as usize];
                    let _ = ix.dec_lock_ref(h);
                }
                _ => {
                    let before = ix.total_size();
                    let e = ix.evict(next(5) as usize);
                    assert_eq!(ix.total_size(), before - e.freed);
                }
            }
            check(&ix);
        }
    }
}
