//! The simulator's model of a model server's prompt cache, for the prefix-aware routing tests
//! and benchmarks: which prompts this server was sent before, and so how much of a new prompt
//! a real server (llama.cpp, vLLM) could take from its KV cache instead of computing it again.
//!
//! A prompt is the JSON of a chat's `messages` (or a completion's `prompt`) as the simulator
//! serializes it: its leading blocks of [`BLOCK`] bytes are hashed in a chain, and a block
//! counts as cached when a prompt seen before had the same prefix up to its end. Bounded: at
//! most [`ENTRIES`] block hashes, the oldest forgotten first. Owns nothing else; it must not
//! depend on the gateway (the simulator is its own program).

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};

/// Bytes per block.
const BLOCK: usize = 64;
/// Block hashes remembered.
const ENTRIES: usize = 1 << 16;

/// What a server remembers of the prompts it was sent (a few MB at most).
#[derive(Default)]
pub(super) struct PromptCache {
    seen: HashSet<u64>,
    order: VecDeque<u64>,
    /// Prompts looked up, their bytes, and the bytes found cached.
    pub prompts: u64,
    pub bytes: u64,
    pub cached_bytes: u64,
}

impl PromptCache {
    /// Looks `prompt` up (returns the bytes of it a previous prompt shared, in whole blocks)
    /// and remembers it.
    pub(super) fn see(&mut self, prompt: &[u8]) -> u64 {
        let hasher =
            std::hash::BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default();
        let mut prev = 0u64;
        let mut cached = 0u64;
        let mut hit = true;
        for block in prompt.chunks_exact(BLOCK) {
            let mut h = hasher.build_hasher();
            h.write_u64(prev);
            h.write(block);
            prev = h.finish();
            hit = hit && self.seen.contains(&prev);
            if hit {
                cached += BLOCK as u64;
            } else if self.seen.insert(prev) {
                self.order.push_back(prev);
                if self.order.len() > ENTRIES {
                    if let Some(old) = self.order.pop_front() {
                        self.seen.remove(&old);
                    }
                }
            }
        }
        self.prompts += 1;
        self.bytes += prompt.len() as u64;
        self.cached_bytes += cached;
        cached
    }

    pub(super) fn entries(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prompt_that_extends_one_seen_is_cached_up_to_where_they_part() {
        let mut c = PromptCache::default();
        let first = vec![b'a'; 1000];
        assert_eq!(c.see(&first), 0);
        let mut second = first.clone();
        second.extend([b'b'; 500]);
        // 1000 bytes shared: 15 whole blocks of 64.
        assert_eq!(c.see(&second), 960);
        assert_eq!(c.see(&second), 1472, "all of its whole blocks");
        assert_eq!(c.see(b"other"), 0);
        let mut parted = vec![b'a'; 100];
        parted.extend([b'c'; 200]);
        assert_eq!(c.see(&parted), 64);
        assert_eq!((c.prompts, c.bytes, c.cached_bytes), (5, 4305, 2496));
    }

    #[test]
    fn it_stays_within_its_bound() {
        let mut c = PromptCache::default();
        for i in 0..(ENTRIES as u64 / 8 + 100) {
            let p: Vec<u8> = i.to_le_bytes().repeat(64);
            c.see(&p);
        }
        assert!(c.entries() <= ENTRIES);
        assert_eq!(c.order.len(), c.entries());
    }
}
