//! Prefix-aware routing's decision core (issue 24): which deployment of a model most likely
//! still holds a request's prompt prefix in its KV cache, judged, as SGLang's approximate
//! cache-aware router does, from what the gateway itself sent where, without asking the
//! servers.
//!
//! Owns: the rendering of a request as bytes ([`chat_prompt`]), the prompt's chained block
//! hashes ([`blocks`]), the bounded index of the prefixes recently sent to each deployment
//! ([`PrefixIndex`], one per model), the choice between the longest match and the least load
//! ([`choose`]), the bounded session-affinity map ([`Sessions`]), and [`Recall`], which holds
//! the one of them a model's policy uses and answers admission's questions.
//!
//! Must not: do I/O, read a clock, take a lock, or panic on any input. Admission keeps one
//! [`Recall`] per model in its core, under the model's lock: it asks it where a request belongs
//! ([`Recall::prefer`]) as it routes, tells it where the request went ([`Recall::ran`]), and
//! has it forget a deployment that was removed or broke. A deployment is its slot in the
//! model's list (slots keep their places across reloads); slots 0..[`MAX_SLOTS`] are indexed,
//! a higher one is neither recorded nor matched. A request's [`Affinity`] (its block hashes,
//! its session) is computed before the lock is taken, and travels with it through the queue.

use std::hash::{BuildHasher, Hasher};

use serde::{Deserialize, Serialize};

use crate::jsonspan::{member_key, top_level_members};
use crate::routing::Policy;

/// What a request brings to the affinity policies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum Affinity {
    /// Nothing (the model's policy has no affinity, or the request has no prompt or session).
    #[default]
    None,
    /// Its prompt's block hashes ([`blocks`] of [`chat_prompt`]).
    Prompt(Box<[u64]>),
    /// Its session as sent (hashed before it is kept, see [`Sessions`]).
    Session(Box<[u8]>),
}

impl Affinity {
    /// What `body` (an OpenAI request) brings to `policy`: its prompt's blocks under
    /// `prefix-aware`; under `session`, `session` (the `x-mofa-session` header) or else the
    /// body's `user` (its raw JSON value, a string or anything else).
    pub(crate) fn of(policy: Policy, body: &[u8], session: Option<&[u8]>) -> Affinity {
        match policy {
            Policy::PrefixAware => match chat_prompt(body) {
                Some(p) => Affinity::Prompt(blocks(p, DEFAULT_BLOCK_BYTES).into()),
                None => Affinity::None,
            },
            Policy::Session => match session.or_else(|| member(body, "user")) {
                Some(s) if !s.is_empty() && s != b"null" => Affinity::Session(s.into()),
                _ => Affinity::None,
            },
            _ => Affinity::None,
        }
    }
}

/// The raw value of the top-level member `name` of a JSON object.
fn member<'a>(body: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let members = top_level_members(body)?;
    let m = members.iter().find(|m| member_key(body, m) == name)?;
    body.get(m.value.clone())
}

/// The least match that makes a prefix choice: a share of the prompt (a float in [0, 1]) or
/// a length in bytes (an integer; about 4 bytes a token).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum MinMatch {
    Bytes(u64),
    Share(f64),
}

impl Default for MinMatch {
    fn default() -> Self {
        MinMatch::Share(0.5)
    }
}

impl MinMatch {
    /// As a share of a prompt of `total_blocks`: a length becomes the share its blocks are
    /// (above 1 when the prompt is shorter: no choice).
    fn share(self, total_blocks: u32) -> f64 {
        match self {
            MinMatch::Share(s) => s,
            MinMatch::Bytes(b) => {
                let blocks = b.div_ceil(DEFAULT_BLOCK_BYTES as u64);
                blocks as f64 / f64::from(total_blocks.max(1))
            }
        }
    }
}

/// The affinity policies' settings (`[routing]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Settings {
    /// `prefix_min_match`.
    pub min_match: MinMatch,
    /// `prefix_balance_threshold`: how many more requests in flight than the least-loaded
    /// deployment the preferred one may have and still be chosen.
    pub balance: u32,
    /// `prefix_cache_entries`: blocks remembered per model.
    pub prefix_entries: usize,
    /// `session_cache_entries`: sessions remembered per model.
    pub session_entries: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            min_match: MinMatch::default(),
            balance: 8,
            prefix_entries: 65_536,
            session_entries: 65_536,
        }
    }
}

/// What one model remembers for its affinity policy.
pub(crate) enum Recall {
    /// Its policy has no affinity.
    Nothing,
    Prefixes(PrefixIndex),
    Sessions(Sessions),
}

impl std::fmt::Debug for Recall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Recall::Nothing => f.write_str("Nothing"),
            Recall::Prefixes(i) => write!(f, "Prefixes({} entries)", i.len()),
            Recall::Sessions(s) => write!(f, "Sessions({} entries)", s.len()),
        }
    }
}

/// Where a request belongs, as [`Recall::prefer`] judged it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Preference {
    /// The deployment to take if it is free (already within the balance threshold).
    pub dep: Option<usize>,
    /// Per slot, the leading blocks of the prompt it holds (all 0 without a prompt).
    matched: [u32; MAX_SLOTS],
    /// The prompt's blocks (`None`: the request brought no prompt).
    total: Option<u32>,
}

impl Preference {
    /// No preference.
    pub(crate) const NONE: Preference = Preference {
        dep: None,
        matched: [0; MAX_SLOTS],
        total: None,
    };

    /// The share of the prompt that deployment `dep` holds (for `x-mofa-prefix-match`);
    /// `None` when the request brought no prompt.
    pub(crate) fn share_on(&self, dep: usize) -> Option<f64> {
        let total = self.total?;
        Some(share(self.matched.get(dep).copied().unwrap_or(0), total))
    }
}

/// The memory a model keeps for `policy`: an index of prefixes, a map of sessions, or nothing.
impl Recall {
    pub(crate) fn new(policy: Policy, s: &Settings) -> Recall {
        match policy {
            Policy::PrefixAware => Recall::Prefixes(PrefixIndex::new(s.prefix_entries)),
            Policy::Session => Recall::Sessions(Sessions::new(s.session_entries)),
            _ => Recall::Nothing,
        }
    }

    /// It is what `policy` with settings `s` would make (a reload keeps it then).
    pub(crate) fn fits(&self, policy: Policy, s: &Settings) -> bool {
        match self {
            Recall::Nothing => !policy.has_affinity(),
            Recall::Prefixes(i) => {
                policy == Policy::PrefixAware && i.capacity() == s.prefix_entries.max(1)
            }
            Recall::Sessions(m) => {
                policy == Policy::Session && m.capacity() == s.session_entries.max(1)
            }
        }
    }

    /// Where a request bringing `wants` belongs: the deployment with the longest prefix of
    /// its prompt ([`choose`]), or the one its session last ran on, provided it can take the
    /// request now and is within `s.balance` requests in flight of the least loaded.
    /// `loads[i]`: `Some(in_flight)` for a deployment that can take the request now.
    pub(crate) fn prefer(
        &mut self,
        wants: &Affinity,
        loads: &[Option<u32>],
        s: &Settings,
    ) -> Preference {
        match (self, wants) {
            (Recall::Prefixes(index), Affinity::Prompt(blocks)) => {
                let total = u32::try_from(blocks.len()).unwrap_or(u32::MAX);
                let matched = index.matches(blocks);
                let n = loads.len().min(MAX_SLOTS);
                let min = s.min_match.share(total);
                let dep = match choose(&matched[..n], total, &loads[..n], min, s.balance) {
                    Choice::Prefix { dep, .. } => Some(dep),
                    Choice::LeastLoad => None,
                };
                Preference {
                    dep,
                    matched,
                    total: Some(total),
                }
            }
            (Recall::Sessions(map), Affinity::Session(key)) => {
                let least = loads.iter().flatten().min().copied();
                let dep = map.get(key).filter(|&d| {
                    let load = loads.get(d).copied().flatten();
                    matches!((load, least), (Some(l), Some(m)) if l <= m.saturating_add(s.balance))
                });
                Preference {
                    dep,
                    ..Preference::NONE
                }
            }
            _ => Preference::NONE,
        }
    }

    /// The request bringing `wants` was sent to `dep`.
    pub(crate) fn ran(&mut self, wants: &Affinity, dep: usize) {
        match (self, wants) {
            (Recall::Prefixes(index), Affinity::Prompt(blocks)) => index.record(blocks, dep),
            (Recall::Sessions(map), Affinity::Session(key)) => map.set(key, dep),
            _ => {}
        }
    }

    /// Forgets deployment `dep` (removed, or broken: its cache is gone or unusable).
    pub(crate) fn forget(&mut self, dep: usize) {
        match self {
            Recall::Nothing => {}
            Recall::Prefixes(index) => index.forget(dep),
            Recall::Sessions(map) => map.forget(dep),
        }
    }

    /// `(kind, entries, capacity, bytes)` for the admin view and the gauges.
    pub(crate) fn size(&self) -> Option<(&'static str, usize, usize, usize)> {
        match self {
            Recall::Nothing => None,
            Recall::Prefixes(i) => Some(("prefix", i.len(), i.capacity(), i.bytes())),
            Recall::Sessions(m) => Some(("session", m.len(), m.capacity(), m.bytes())),
        }
    }
}

/// The block size a model's index uses unless configured: 256 bytes, about 64 tokens of
/// English or JSON. Fine enough that a match's resolution (one block) is small against the
/// prompts worth routing for (a 1500-token system prompt is 24 blocks), coarse enough that an
/// index of 10 000 entries remembers some 400 such prompts, and that hashing costs one short
/// hash per 256 bytes.
pub(crate) const DEFAULT_BLOCK_BYTES: usize = 256;

/// The smallest block size: a smaller one (0 included) is taken as this.
pub(crate) const MIN_BLOCK_BYTES: usize = 16;

/// The deployments an index tells apart: slots 0..64, one bit each.
pub(crate) const MAX_SLOTS: usize = 64;

/// The fixed seed of the block hashes: the same prompt hashes the same in every index.
const BLOCK_SEED: u64 = 0x6d6f_6661_7072_6566; // "mofapref"

/// The raw bytes of the prompt of an OpenAI body: the top-level `messages` value of a chat
/// body, else the `prompt` value of a completions body (`None`: neither, or not an object).
///
/// Raw bytes are a stable rendering of a conversation: a client (the official SDKs, LangChain,
/// `curl` scripts) serializes the earlier turns the same way every time, so turn n+1's
/// `messages` starts with turn n's bytes up to the `]` after its last message. Only the
/// request's own bytes are read (no parse, no re-serialization: found by the scanner that
/// rewrites the body, [`crate::jsonspan`]). A client that re-serializes earlier turns
/// differently (other spacing, key order) simply matches less; `tools` and sampling fields are
/// not part of the rendering.
pub(crate) fn chat_prompt(body: &[u8]) -> Option<&[u8]> {
    let members = top_level_members(body)?;
    let value = |name: &str| {
        members
            .iter()
            .find(|m| member_key(body, m) == name)
            .map(|m| m.value.clone())
    };
    body.get(value("messages").or_else(|| value("prompt"))?)
}

/// The most blocks of a prompt that are hashed, matched and recorded: its first 512 KB at the
/// default block size (some 130 000 tokens). Bounds the work per request (hashing, and the
/// lookups under the model's lock) and what one request can push out of the index, whatever
/// the body's size; a longer prompt is routed by its beginning, which is what a prefix is.
pub(crate) const MAX_BLOCKS: usize = 2048;

/// The chained hashes of `prompt`'s full blocks of `block_bytes` (at least
/// [`MIN_BLOCK_BYTES`]), at most [`MAX_BLOCKS`]: hash i covers bytes
/// `[0, (i+1) * block_bytes)`, computed as `h_i = hash(h_{i-1}, block_i)`, so equal hashes at i
/// mean (but for a 64-bit collision) equal prefixes. A trailing partial block is not indexed.
pub(crate) fn blocks(prompt: &[u8], block_bytes: usize) -> Vec<u64> {
    let state = foldhash::quality::FixedState::with_seed(BLOCK_SEED);
    let mut prev = 0u64;
    prompt
        .chunks_exact(block_bytes.max(MIN_BLOCK_BYTES))
        .take(MAX_BLOCKS)
        .map(|block| {
            let mut h = state.build_hasher();
            h.write_u64(prev);
            h.write(block);
            prev = h.finish();
            prev
        })
        .collect()
}

/// A deployment's bit, if its slot is indexed.
fn bit(dep: usize) -> Option<u64> {
    (dep < MAX_SLOTS).then(|| 1u64 << dep)
}

/// A model's index of the prompt prefixes recently sent to each deployment, bounded in
/// entries (one per block hash), evicting the least recently used.
///
/// `record` and `matches` are O(blocks); `forget` walks the whole index.
pub(crate) struct PrefixIndex {
    /// Block hash -> the deployments (bits) that were sent a prompt with that prefix.
    lru: Lru<u64>,
}

impl PrefixIndex {
    /// An empty index of at most `capacity` entries (blocks); at least 1.
    pub(crate) fn new(capacity: usize) -> PrefixIndex {
        PrefixIndex {
            lru: Lru::new(capacity),
        }
    }

    /// Marks every block as held by `dep` (a slot ≥ [`MAX_SLOTS`] is ignored) and as the most
    /// recently used, the first block most: the deepest blocks of the least recent prompts are
    /// evicted first, as a radix tree evicts its leaves, so what is left of a prompt is always
    /// a prefix.
    pub(crate) fn record(&mut self, blocks: &[u64], dep: usize) {
        let Some(bit) = bit(dep) else { return };
        for &b in blocks.iter().rev() {
            *self.lru.entry(b, 0) |= bit;
        }
    }

    /// For each slot, how many leading blocks of `blocks` it holds: the count up to the first
    /// block it does not hold (eviction may have taken a block while its successors stay).
    /// Does not touch recency.
    pub(crate) fn matches(&self, blocks: &[u64]) -> [u32; MAX_SLOTS] {
        let mut out = [0u32; MAX_SLOTS];
        let mut alive = u64::MAX;
        for (i, b) in blocks.iter().enumerate() {
            let held = self.lru.get(*b).unwrap_or(0);
            set_bits(&mut out, alive & !held, i);
            alive &= held;
            if alive == 0 {
                return out;
            }
        }
        set_bits(&mut out, alive, blocks.len());
        out
    }

    /// Drops `dep` from every entry (it was removed, or broke: its cache is gone or unusable),
    /// removing the entries left empty.
    pub(crate) fn forget(&mut self, dep: usize) {
        if let Some(bit) = bit(dep) {
            self.lru.retain(|deps| {
                *deps &= !bit;
                *deps != 0
            });
        }
    }

    /// Entries (blocks) held now.
    pub(crate) fn len(&self) -> usize {
        self.lru.len()
    }

    /// The most entries it holds.
    pub(crate) fn capacity(&self) -> usize {
        self.lru.capacity
    }

    /// The memory it holds, approximately (for the gauge): about 80 bytes an entry once
    /// full (a 24-byte node, and the map's 17-byte buckets, which the churn of eviction keeps
    /// at about twice the entries).
    pub(crate) fn bytes(&self) -> usize {
        self.lru.bytes()
    }
}

/// `out[d] = n` for every slot d in `mask`.
fn set_bits(out: &mut [u32; MAX_SLOTS], mut mask: u64, n: usize) {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    while mask != 0 {
        out[mask.trailing_zeros() as usize] = n;
        mask &= mask - 1;
    }
}

/// The deployment a request should go to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Choice {
    /// The one holding the longest prefix, `share` of the prompt's blocks.
    Prefix { dep: usize, share: f64 },
    /// No deployment holds enough of the prompt within the balance: the caller's least-load
    /// pick decides (and reports that deployment's [`share`]).
    LeastLoad,
}

/// The share of a prompt's `total_blocks` that `matched` blocks are, in [0, 1] (0 for an
/// empty prompt): the value of `x-mofa-prefix-match`.
pub(crate) fn share(matched: u32, total_blocks: u32) -> f64 {
    if total_blocks == 0 {
        return 0.0;
    }
    (f64::from(matched) / f64::from(total_blocks)).min(1.0)
}

/// The deployment with the longest match (`matched[i]`, from [`PrefixIndex::matches`]) whose
/// share is at least `min_match` and whose load is within `balance` of the least: `loads[i]`
/// is `Some(in_flight)` for a deployment that can take the request now, `None` for one that
/// cannot. Ties go to fewer in flight, then to the lower slot. A deployment with no match is
/// never a prefix choice.
pub(crate) fn choose(
    matched: &[u32],
    total_blocks: u32,
    loads: &[Option<u32>],
    min_match: f64,
    balance: u32,
) -> Choice {
    let Some(least) = loads.iter().flatten().min().filter(|_| total_blocks > 0) else {
        return Choice::LeastLoad;
    };
    let ceiling = least.saturating_add(balance);
    let best = matched
        .iter()
        .zip(loads)
        .enumerate()
        .filter_map(|(i, (&m, &load))| Some((i, m, load?)))
        .filter(|&(_, m, load)| m > 0 && load <= ceiling && share(m, total_blocks) >= min_match)
        .min_by_key(|&(i, m, load)| (std::cmp::Reverse(m), load, i));
    match best {
        Some((dep, m, _)) => Choice::Prefix {
            dep,
            share: share(m, total_blocks),
        },
        None => Choice::LeastLoad,
    }
}

/// Session affinity: a bounded LRU map from a session (the OpenAI `user` field or the
/// `x-mofa-session` header) to the deployment it last ran on. The session is kept as a hash
/// under a per-map random seed, never as sent (it may be a user id).
pub(crate) struct Sessions {
    lru: Lru<u32>,
    keys: foldhash::quality::RandomState,
}

impl Sessions {
    /// An empty map of at most `capacity` sessions; at least 1.
    pub(crate) fn new(capacity: usize) -> Sessions {
        Sessions {
            lru: Lru::new(capacity),
            keys: foldhash::quality::RandomState::default(),
        }
    }

    fn key(&self, session: &[u8]) -> u64 {
        self.keys.hash_one(session)
    }

    /// The session's deployment, if known (and now the most recently used).
    pub(crate) fn get(&mut self, session: &[u8]) -> Option<usize> {
        let key = self.key(session);
        self.lru.touch(key).map(|&mut d| d as usize)
    }

    /// The session now runs on `dep` (a slot ≥ [`MAX_SLOTS`] is ignored).
    pub(crate) fn set(&mut self, session: &[u8], dep: usize) {
        if dep < MAX_SLOTS {
            let key = self.key(session);
            *self.lru.entry(key, dep as u32) = dep as u32;
        }
    }

    /// Drops every session on `dep`.
    pub(crate) fn forget(&mut self, dep: usize) {
        self.lru.retain(|d| *d as usize != dep);
    }

    pub(crate) fn len(&self) -> usize {
        self.lru.len()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.lru.capacity
    }

    pub(crate) fn bytes(&self) -> usize {
        self.lru.bytes()
    }
}

/// No node: the end of the recency list.
const NIL: u32 = u32::MAX;

/// One entry: its key, its value, its neighbours in recency order.
struct Node<V> {
    key: u64,
    value: V,
    /// More recent.
    prev: u32,
    /// Less recent.
    next: u32,
}

/// A map of u64 keys bounded in entries, evicting the least recently used: a hash map to
/// nodes in a `Vec`, linked by index in recency order (O(1) touch, insert and evict; no
/// unsafe). The map hashes its keys again under a per-process seed (foldhash's
/// `RandomState`, which the crate draws once per process, as std's does): a block hash has a
/// public seed, so a client could otherwise aim many blocks at one bucket.
struct Lru<V> {
    map: foldhash::HashMap<u64, u32>,
    nodes: Vec<Node<V>>,
    /// Nodes emptied by `retain`, to reuse.
    free: Vec<u32>,
    /// The most recent node.
    head: u32,
    /// The least recent node.
    tail: u32,
    capacity: usize,
    /// The map's largest capacity seen after an insert: that of its allocation (a removal
    /// leaves a tombstone that lowers `capacity()` until the table is rehashed; it never
    /// shrinks).
    map_capacity: usize,
}

impl<V: Copy> Lru<V> {
    fn new(capacity: usize) -> Lru<V> {
        Lru {
            map: foldhash::HashMap::default(),
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            capacity: capacity.clamp(1, NIL as usize - 1),
            map_capacity: 0,
        }
    }

    fn len(&self) -> usize {
        self.map.len()
    }

    fn get(&self, key: u64) -> Option<V> {
        self.map.get(&key).map(|&i| self.nodes[i as usize].value)
    }

    /// The value at `key`, now the most recent.
    fn touch(&mut self, key: u64) -> Option<&mut V> {
        let i = *self.map.get(&key)?;
        self.make_recent(i);
        Some(&mut self.nodes[i as usize].value)
    }

    /// The value at `key` (inserted as `new` if absent, evicting the least recent entry if
    /// full), now the most recent.
    fn entry(&mut self, key: u64, new: V) -> &mut V {
        let i = match self.map.get(&key) {
            Some(&i) => {
                self.make_recent(i);
                i
            }
            None => {
                let i = self.slot(key, new);
                self.map.insert(key, i);
                self.map_capacity = self.map_capacity.max(self.map.capacity());
                self.push_front(i);
                i
            }
        };
        &mut self.nodes[i as usize].value
    }

    /// A node for a new entry, unlinked: the least recent one's if full, else a free one.
    fn slot(&mut self, key: u64, value: V) -> u32 {
        let node = Node {
            key,
            value,
            prev: NIL,
            next: NIL,
        };
        let i = if self.map.len() >= self.capacity && self.tail != NIL {
            let i = self.tail;
            self.unlink(i);
            self.map.remove(&self.nodes[i as usize].key);
            i
        } else if let Some(i) = self.free.pop() {
            i
        } else {
            if self.nodes.len() == self.nodes.capacity() {
                // Double, but never past the bound.
                let more = self
                    .nodes
                    .len()
                    .max(4)
                    .min(self.capacity - self.nodes.len());
                self.nodes.reserve_exact(more);
            }
            self.nodes.push(node);
            return (self.nodes.len() - 1) as u32;
        };
        self.nodes[i as usize] = node;
        i
    }

    /// Keeps the entries for which `keep` (which may edit the value) says so.
    fn retain(&mut self, mut keep: impl FnMut(&mut V) -> bool) {
        let mut i = self.head;
        while i != NIL {
            let next = self.nodes[i as usize].next;
            if !keep(&mut self.nodes[i as usize].value) {
                self.unlink(i);
                self.map.remove(&self.nodes[i as usize].key);
                self.free.push(i);
            }
            i = next;
        }
    }

    fn make_recent(&mut self, i: u32) {
        if self.head != i {
            self.unlink(i);
            self.push_front(i);
        }
    }

    fn unlink(&mut self, i: u32) {
        let Node { prev, next, .. } = self.nodes[i as usize];
        match prev {
            NIL => self.head = next,
            p => self.nodes[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.nodes[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, i: u32) {
        let old = self.head;
        let node = &mut self.nodes[i as usize];
        node.prev = NIL;
        node.next = old;
        match old {
            NIL => self.tail = i,
            o => self.nodes[o as usize].prev = i,
        }
        self.head = i;
    }

    /// The heap it holds, approximately: its nodes, its free list, and the map's buckets (a
    /// key, a node index and one control byte each, at most 7/8 full).
    fn bytes(&self) -> usize {
        let bucket = std::mem::size_of::<(u64, u32)>() + 1;
        self.nodes.capacity() * std::mem::size_of::<Node<V>>()
            + self.free.capacity() * std::mem::size_of::<u32>()
            + self.map_capacity * 8 / 7 * bucket
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    const BB: usize = DEFAULT_BLOCK_BYTES;

    /// A chat body as an SDK sends it: `messages` serialized whole, between other fields.
    fn chat_body(messages: &serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "model": "gemma",
            "messages": messages,
            "temperature": 0.2,
            "stream": true,
        }))
        .unwrap()
    }

    fn system_prompt() -> String {
        (0..120)
            .map(|i| format!("Rule {i}: answer briefly and cite the manual. "))
            .collect()
    }

    #[test]
    fn a_conversations_next_turn_matches_the_deployment_of_the_last() {
        let turn1 = json!([
            {"role": "system", "content": system_prompt()},
            {"role": "user", "content": "How do I reset the router?"},
        ]);
        let mut turn2 = turn1.clone();
        let more = turn2.as_array_mut().unwrap();
        let reply = "Hold the button for 10 s, then wait for the light. ".repeat(40);
        more.push(json!({"role": "assistant", "content": reply}));
        more.push(json!({"role": "user", "content": "And then? \u{e9}\"quoted\""}));

        let (b1, b2) = (chat_body(&turn1), chat_body(&turn2));
        let (p1, p2) = (chat_prompt(&b1).unwrap(), chat_prompt(&b2).unwrap());
        assert_eq!(p1, serde_json::to_vec(&turn1).unwrap());
        // Turn 2 starts with turn 1's bytes up to the `]` after its last message.
        assert!(p2.starts_with(&p1[..p1.len() - 1]));

        let mut index = PrefixIndex::new(10_000);
        let blocks1 = blocks(p1, BB);
        assert!(blocks1.len() >= 20, "{} blocks", blocks1.len());
        index.record(&blocks1, 0);
        let blocks2 = blocks(p2, BB);
        let m = index.matches(&blocks2);
        // Every full block of turn 1 within the shared bytes (all of them, unless turn 1's
        // closing `]` ended a block).
        assert_eq!(m[0] as usize, (p1.len() - 1) / BB);
        assert!(m[0] as usize >= blocks1.len() - 1);
        assert!(m[1..].iter().all(|&n| n == 0), "{m:?}");

        let total = blocks2.len() as u32;
        let loads = [Some(3), Some(0)];
        match choose(&m[..2], total, &loads, 0.5, 4) {
            Choice::Prefix { dep: 0, share } => {
                assert_eq!(share, f64::from(m[0]) / f64::from(total));
                assert!(share > 0.5 && share < 1.0, "{share}");
            }
            other => panic!("{other:?}"),
        }
        // Turn 2 recorded on dep 0 too: turn 3 would match all of turn 2.
        index.record(&blocks2, 0);
        assert_eq!(index.matches(&blocks2)[0] as usize, blocks2.len());
    }

    #[test]
    fn the_prompt_is_messages_else_prompt() {
        let body = br#"{"model":"m","prompt":"once upon a time","max_tokens":5}"#;
        assert_eq!(chat_prompt(body), Some(&br#""once upon a time""#[..]));
        let body = br#" { "messag\u0065s" : [ {"role":"user"} ] , "prompt":"x"}"#;
        assert_eq!(chat_prompt(body), Some(&br#"[ {"role":"user"} ]"#[..]));
        assert_eq!(chat_prompt(br#"{"model":"m"}"#), None);
        assert_eq!(chat_prompt(b"[1,2]"), None);
        assert_eq!(chat_prompt(b""), None);
        assert_eq!(chat_prompt(br#"{"messages":[1,"#), None);
    }

    #[test]
    fn blocks_are_chained_full_blocks_only() {
        let a = vec![b'a'; 3 * BB + 10];
        let mut b = a.clone();
        b[BB + 5] = b'b';
        let (ha, hb) = (blocks(&a, BB), blocks(&b, BB));
        assert_eq!(ha.len(), 3, "the partial block is not indexed");
        assert_eq!(ha[0], hb[0]);
        // The same block contents after a different prefix hash differently.
        assert_ne!(ha[1], hb[1]);
        assert_ne!(ha[2], hb[2]);
        assert_eq!(blocks(&a, BB), ha, "deterministic");
        assert!(blocks(&a[..BB - 1], BB).is_empty());
    }

    #[test]
    fn choose_honours_min_match_balance_unavailability_and_ties() {
        // dep 0 holds 8 of 10 blocks, dep 1 holds 3.
        let m = [8, 3, 0];
        let idle = [Some(0), Some(0), Some(0)];
        let pick =
            |m: &[u32], loads: &[Option<u32>], min: f64, bal: u32| choose(m, 10, loads, min, bal);
        assert_eq!(
            pick(&m, &idle, 0.5, 2),
            Choice::Prefix { dep: 0, share: 0.8 }
        );
        // min_match: 80% is not 90%; dep 1's 30% is below 50% too.
        assert_eq!(pick(&m, &idle, 0.9, 2), Choice::LeastLoad);
        assert_eq!(
            pick(&m, &idle, 0.3, 2),
            Choice::Prefix { dep: 0, share: 0.8 }
        );
        // A saturated preferred deployment loses: dep 0 is 5 above the least (dep 2).
        let loads = [Some(5), Some(1), Some(0)];
        assert_eq!(pick(&m, &loads, 0.5, 4), Choice::LeastLoad);
        assert_eq!(
            pick(&m, &loads, 0.5, 5),
            Choice::Prefix { dep: 0, share: 0.8 }
        );
        // ... to the next longest match within the balance, if it is long enough.
        assert_eq!(
            pick(&m, &loads, 0.2, 4),
            Choice::Prefix { dep: 1, share: 0.3 }
        );
        // A deployment that cannot take the request now is not chosen, nor counted as least.
        let loads = [None, Some(7), Some(9)];
        assert_eq!(
            pick(&m, &loads, 0.2, 0),
            Choice::Prefix { dep: 1, share: 0.3 }
        );
        assert_eq!(pick(&m, &[None, None, None], 0.0, 100), Choice::LeastLoad);
        // Ties: fewer in flight, then the lower slot.
        let m = [4, 4, 4];
        assert_eq!(
            pick(&m, &[Some(2), Some(1), Some(1)], 0.1, 9),
            Choice::Prefix { dep: 1, share: 0.4 }
        );
        assert_eq!(
            pick(&m, &idle, 0.1, 0),
            Choice::Prefix { dep: 0, share: 0.4 }
        );
        // No match is never a prefix choice, even at min_match 0; an empty prompt matches none.
        assert_eq!(pick(&[0, 0], &idle[..2], 0.0, 9), Choice::LeastLoad);
        assert_eq!(choose(&[3], 0, &[Some(0)], 0.0, 0), Choice::LeastLoad);
        assert_eq!(share(3, 0), 0.0);
    }

    #[test]
    fn the_index_stays_within_its_bound_and_forgets_the_oldest() {
        const CAP: usize = 10_000;
        const PROMPTS: usize = 100_000;
        const PER: usize = 4;
        let mut index = PrefixIndex::new(CAP);
        let prompt = |i: usize| blocks(format!("{i:016}").repeat(PER * 64 / 16).as_bytes(), 64);
        let mut peak_bytes = 0;
        for i in 0..PROMPTS {
            let b = prompt(i);
            assert_eq!(b.len(), PER);
            index.record(&b, i % 3);
            assert!(index.len() <= CAP);
            peak_bytes = peak_bytes.max(index.bytes());
        }
        assert_eq!(index.len(), CAP);
        assert_eq!(index.capacity(), CAP);
        // The most recent CAP / PER prompts are whole; the oldest are gone.
        for i in PROMPTS - CAP / PER..PROMPTS {
            let m = index.matches(&prompt(i));
            assert_eq!(m[i % 3] as usize, PER, "prompt {i}");
            assert_eq!(m.iter().filter(|&&n| n > 0).count(), 1);
        }
        for i in 0..PROMPTS - CAP / PER - 1 {
            assert_eq!(index.matches(&prompt(i)), [0; MAX_SLOTS], "prompt {i}");
        }
        // Bounded memory: well under 100 bytes an entry.
        assert!(peak_bytes < CAP * 100, "{peak_bytes} bytes");
        assert_eq!(index.bytes(), peak_bytes, "no growth once full");
    }

    #[test]
    fn eviction_takes_the_deepest_blocks_first() {
        let mut index = PrefixIndex::new(2);
        let b = blocks(&[7u8; 5 * BB], BB);
        index.record(&b, 3);
        assert_eq!(index.len(), 2);
        assert_eq!(index.matches(&b)[3], 2, "what is left is a prefix");
        // A lost leading block stops the match even if later ones are held.
        let mut index = PrefixIndex::new(10);
        index.record(&b[1..], 0);
        assert_eq!(index.matches(&b)[0], 0);
        assert_eq!(index.matches(&b[1..])[0], 4);
    }

    #[test]
    fn forget_drops_a_deployment_everywhere() {
        let mut index = PrefixIndex::new(1_000);
        let shared: Vec<u8> = system_prompt().into_bytes();
        let mut only1 = 0;
        for i in 0..20 {
            let mut p = shared.clone();
            p.extend(format!("question {i} ").repeat(100).bytes());
            let b = blocks(&p, BB);
            index.record(&b, i % 2);
            if i % 2 == 1 {
                only1 += b.len() - blocks(&shared, BB).len();
            }
        }
        let before = index.len();
        let probe = blocks(&shared, BB);
        assert_eq!(index.matches(&probe)[1] as usize, probe.len());
        index.forget(1);
        assert_eq!(
            index.len(),
            before - only1,
            "entries held by dep 1 alone are gone"
        );
        assert_eq!(index.matches(&probe)[1], 0);
        assert_eq!(index.matches(&probe)[0] as usize, probe.len());
        index.forget(0);
        assert_eq!(index.len(), 0);
        // Emptied nodes are reused, not grown.
        let bytes = index.bytes();
        index.record(&probe, 5);
        assert_eq!(index.bytes(), bytes);
        assert_eq!(index.matches(&probe)[5] as usize, probe.len());
    }

    #[test]
    fn sessions_are_bounded_hashed_and_forgotten() {
        let mut s = Sessions::new(2);
        assert_eq!(s.get(b"alice"), None);
        s.set(b"alice", 1);
        s.set(b"bob", 2);
        assert_eq!(s.get(b"alice"), Some(1)); // alice is now the most recent
        s.set(b"carol", 1); // evicts bob
        assert_eq!((s.len(), s.capacity()), (2, 2));
        assert_eq!(s.get(b"bob"), None);
        s.set(b"alice", 0);
        assert_eq!(s.get(b"alice"), Some(0));
        s.forget(1);
        assert_eq!(s.get(b"carol"), None);
        assert_eq!(s.len(), 1);
        s.set(b"dave", MAX_SLOTS);
        assert_eq!(s.get(b"dave"), None, "an unindexed slot is ignored");
        assert!(s.bytes() > 0);
    }

    #[test]
    fn no_input_panics() {
        assert!(blocks(&[], 0).is_empty());
        assert_eq!(blocks(&[1; 40], 0).len(), 40 / MIN_BLOCK_BYTES);
        assert_eq!(blocks(&[1; 40], usize::MAX).len(), 0);
        // A huge prompt: only its beginning is hashed.
        let huge = vec![7u8; (MAX_BLOCKS + 10) * DEFAULT_BLOCK_BYTES];
        let b = blocks(&huge, DEFAULT_BLOCK_BYTES);
        assert_eq!(b.len(), MAX_BLOCKS);
        assert_eq!(
            b[..5],
            blocks(&huge[..5 * DEFAULT_BLOCK_BYTES], DEFAULT_BLOCK_BYTES)[..]
        );
        let mut index = PrefixIndex::new(0);
        assert_eq!(index.capacity(), 1);
        index.record(&[], 0);
        index.record(&[1, 2, 3], usize::MAX);
        index.record(&[1, 2, 3], MAX_SLOTS);
        assert_eq!(index.len(), 0);
        index.record(&[1, 2, 3], MAX_SLOTS - 1);
        assert_eq!(index.matches(&[1])[MAX_SLOTS - 1], 1);
        assert_eq!(index.matches(&[]), [0; MAX_SLOTS]);
        index.forget(usize::MAX);
        index.forget(MAX_SLOTS - 1);
        assert_eq!(index.len(), 0);
        let mut index = PrefixIndex::new(usize::MAX);
        index.record(&[9], 0);
        assert_eq!(index.len(), 1);
        assert_eq!(choose(&[], 0, &[], f64::NAN, u32::MAX), Choice::LeastLoad);
        assert_eq!(choose(&[5], 5, &[Some(1)], f64::NAN, 0), Choice::LeastLoad);
        let c = choose(
            &[u32::MAX, 1],
            1,
            &[Some(u32::MAX), Some(0)],
            -1.0,
            u32::MAX,
        );
        assert_eq!(c, Choice::Prefix { dep: 0, share: 1.0 });
        assert_eq!(
            choose(&[1, 2, 3], 3, &[Some(0)], 0.0, 0),
            Choice::Prefix {
                dep: 0,
                share: 1.0 / 3.0
            }
        );
        let mut s = Sessions::new(0);
        s.set(b"", 0);
        s.forget(usize::MAX);
        assert_eq!(s.get(b""), Some(0));
    }

    /// The index against a plain model: a list of (key, deps), the most recent first.
    #[derive(Default)]
    struct Model {
        cap: usize,
        entries: Vec<(u64, u64)>,
    }

    impl Model {
        fn record(&mut self, blocks: &[u64], dep: usize) {
            let Some(bit) = bit(dep) else { return };
            for &b in blocks.iter().rev() {
                let deps = match self.entries.iter().position(|e| e.0 == b) {
                    Some(i) => self.entries.remove(i).1,
                    None => {
                        if self.entries.len() == self.cap {
                            self.entries.pop();
                        }
                        0
                    }
                };
                self.entries.insert(0, (b, deps | bit));
            }
        }
        fn matches(&self, blocks: &[u64]) -> [u32; MAX_SLOTS] {
            let held = |b: u64| self.entries.iter().find(|e| e.0 == b).map_or(0, |e| e.1);
            std::array::from_fn(|d| {
                blocks
                    .iter()
                    .take_while(|&&b| held(b) & (1 << d) != 0)
                    .count() as u32
            })
        }
        fn forget(&mut self, dep: usize) {
            let Some(bit) = bit(dep) else { return };
            for e in &mut self.entries {
                e.1 &= !bit;
            }
            self.entries.retain(|e| e.1 != 0);
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Record(Vec<u64>, usize),
        Forget(usize),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            8 => (proptest::collection::vec(0u64..40, 0..12), 0usize..70)
                .prop_map(|(b, d)| Op::Record(b, d)),
            1 => (0usize..70).prop_map(Op::Forget),
        ]
    }

    proptest! {
        /// Any sequence of records and forgets: the index holds exactly what a plain LRU list
        /// holds, within its bound, and matches the same.
        #[test]
        fn the_index_is_an_lru_of_blocks(
            cap in 1usize..30,
            ops in proptest::collection::vec(op(), 1..80),
            probes in proptest::collection::vec(proptest::collection::vec(0u64..40, 0..10), 1..8),
        ) {
            let mut index = PrefixIndex::new(cap);
            let mut model = Model { cap, ..Model::default() };
            for op in ops {
                match op {
                    Op::Record(b, d) => {
                        index.record(&b, d);
                        model.record(&b, d);
                    }
                    Op::Forget(d) => {
                        index.forget(d);
                        model.forget(d);
                    }
                }
                prop_assert!(index.len() <= cap);
                prop_assert_eq!(index.len(), model.entries.len());
            }
            for p in probes {
                prop_assert_eq!(index.matches(&p), model.matches(&p));
            }
        }

        #[test]
        fn any_bytes_are_a_prompt_or_none(
            body in proptest::collection::vec(any::<u8>(), 0..300),
            bb in 0usize..64,
        ) {
            let p = chat_prompt(&body).unwrap_or(&body);
            let b = blocks(p, bb);
            prop_assert_eq!(b.len(), p.len() / bb.max(MIN_BLOCK_BYTES));
            let mut index = PrefixIndex::new(8);
            index.record(&b, bb);
            prop_assert!(index.len() <= 8);
        }
    }

    /// ns for one request's `blocks` + `matches` + `record`: a 6 KB prompt (about 1500
    /// tokens) in 256-byte blocks, on an index kept full at 10 000 entries; the median of 7
    /// rounds of thread CPU time.
    #[test]
    #[ignore = "benchmark: run in release mode, `cargo test --release --lib prefix -- --ignored`"]
    fn prefix_routing_cost_per_request() {
        const PROMPT: usize = 6 * 1024;
        let system = system_prompt().into_bytes()[..4 * 1024].to_vec();
        // 64 conversations share a 4 KB system prompt; each has its own 2 KB tail.
        let prompts: Vec<Vec<u8>> = (0..64)
            .map(|i| {
                let mut p = system.clone();
                p.extend(
                    format!("conversation {i:04}: ")
                        .repeat(PROMPT)
                        .bytes()
                        .take(PROMPT - system.len()),
                );
                p
            })
            .collect();
        let mut index = PrefixIndex::new(10_000);
        for i in 0..20_000usize {
            index.record(
                &blocks(format!("{i:08}").repeat(PROMPT / 8).as_bytes(), BB),
                i % 4,
            );
        }
        assert_eq!(index.len(), 10_000);
        let mut rounds = Vec::new();
        for round in 0..8 {
            let reps = 20_000;
            let start = crate::benchclock::thread_cpu_ns();
            for r in 0..reps {
                let p = &prompts[r % prompts.len()];
                let b = blocks(std::hint::black_box(p), BB);
                let m = index.matches(&b);
                index.record(&b, (m[0] as usize + r) % 4);
                std::hint::black_box(m);
            }
            if round > 0 {
                rounds.push((crate::benchclock::thread_cpu_ns() - start) as f64 / reps as f64);
            }
        }
        rounds.sort_by(f64::total_cmp);
        eprintln!(
            "prefix: {:.0} ns per request (blocks + matches + record, {} blocks of {BB} B, index of {} entries, {} KB)",
            rounds[3],
            PROMPT / BB,
            index.len(),
            index.bytes() / 1024,
        );
    }
}
