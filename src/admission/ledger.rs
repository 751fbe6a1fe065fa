//! The memory ledger: which local models are resident, the defer and reject thresholds, and
//! which idle models may be evicted (least recently used, at or below the request's priority).

use std::time::Instant;

use super::Priority;
use crate::routing::Block;

// ---------------------------------------------------------------------------------------------
// The memory ledger

/// Memory thresholds, as shares of the capacity.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MemoryLimits {
    /// 0: memory is not tracked.
    pub capacity_mb: u64,
    pub defer: f64,
    pub reject: f64,
}

impl MemoryLimits {
    /// Memory not tracked (an empty ledger, for models whose deployments declare none).
    pub(crate) const OFF: MemoryLimits = MemoryLimits {
        capacity_mb: 0,
        defer: 1.0,
        reject: 1.0,
    };
}

/// One deployment whose model takes memory when loaded.
#[derive(Debug, Clone)]
pub(crate) struct MemEntry {
    pub mb: u64,
    pub resident: bool,
    pub in_flight: u32,
    pub last_used: Option<Instant>,
    pub last_priority: Priority,
    /// How many times it stopped being resident (evicted, unloaded, its process gone): what
    /// a server kept in memory (its prompt cache) is gone each time.
    pub unloads: u64,
}

/// The memory budget shared by all local models: what is resident, what is in use.
#[derive(Debug, Clone)]
pub(crate) struct Ledger {
    pub limits: MemoryLimits,
    pub entries: Vec<MemEntry>,
}

/// Whether a deployment's model can be used now, memory-wise.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum MemVerdict {
    Fits,
    /// Fits once these idle residents are evicted (critical only).
    FitsAfterEvicting(Vec<usize>),
    Blocked(Block),
}

impl Ledger {
    pub(crate) fn new(limits: MemoryLimits) -> Self {
        Ledger {
            limits,
            entries: Vec::new(),
        }
    }

    /// Registers a deployment that takes `mb` when loaded; returns its entry id.
    pub(crate) fn register(&mut self, mb: u64) -> usize {
        self.entries.push(MemEntry {
            mb,
            resident: false,
            unloads: 0,
            in_flight: 0,
            last_used: None,
            last_priority: Priority::Low,
        });
        self.entries.len() - 1
    }

    pub(crate) fn resident_mb(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.resident)
            .map(|e| e.mb)
            .sum()
    }

    fn limit(&self, share: f64) -> f64 {
        self.limits.capacity_mb as f64 * share
    }

    /// Can entry `id` be used by a request of priority `prio`? Does not change anything.
    pub(crate) fn check(&self, id: usize, prio: Priority) -> MemVerdict {
        let e = &self.entries[id];
        if self.limits.capacity_mb == 0 || e.resident {
            return MemVerdict::Fits;
        }
        if e.mb as f64 > self.limit(self.limits.reject) {
            // Even alone it would be over the reject line: it can never be admitted.
            return MemVerdict::Blocked(Block::TooLarge);
        }
        // The line this request may fill memory up to: high and critical skip the defer band.
        let line = self.limit(if prio >= Priority::High {
            self.limits.reject
        } else {
            self.limits.defer
        });
        let resident = self.resident_mb();
        if (resident + e.mb) as f64 <= line {
            return MemVerdict::Fits;
        }
        // Make room by stopping idle residents last used at this priority or lower: lowest
        // priority of last use first, then least recently used.
        let mut idle: Vec<usize> = (0..self.entries.len())
            .filter(|&i| {
                let x = &self.entries[i];
                i != id && x.resident && x.in_flight == 0 && x.last_priority <= prio
            })
            .collect();
        idle.sort_by_key(|&i| (self.entries[i].last_priority, self.entries[i].last_used));
        let mut left = resident;
        let mut evict = Vec::new();
        for i in idle {
            evict.push(i);
            left -= self.entries[i].mb;
            if (left + e.mb) as f64 <= line {
                return MemVerdict::FitsAfterEvicting(evict);
            }
        }
        // Not enough can be freed now: wait in the defer band, else refuse.
        if ((left + e.mb) as f64) <= self.limit(self.limits.reject) {
            MemVerdict::Blocked(Block::MemoryDefer)
        } else {
            MemVerdict::Blocked(Block::MemoryExhausted)
        }
    }

    /// Starts a request on entry `id`: evicts `evict`, makes it resident, counts it in use.
    pub(crate) fn acquire(&mut self, id: usize, prio: Priority, evict: &[usize], now: Instant) {
        for &i in evict {
            self.not_resident(i);
        }
        let e = &mut self.entries[id];
        e.resident = true;
        e.in_flight += 1;
        e.last_used = Some(now);
        e.last_priority = prio;
    }

    /// Marks entry `id` as loaded without a request (the pool's explicit load): evicts `evict`.
    pub(crate) fn load(
        &mut self,
        id: usize,
        prio: Priority,
        now: Instant,
    ) -> Result<Vec<usize>, Block> {
        let evict = match self.check(id, prio) {
            MemVerdict::Fits => Vec::new(),
            MemVerdict::FitsAfterEvicting(e) => e,
            MemVerdict::Blocked(b) => return Err(b),
        };
        for &i in &evict {
            self.not_resident(i);
        }
        let e = &mut self.entries[id];
        e.resident = true;
        e.last_used = Some(now);
        e.last_priority = e.last_priority.max(prio);
        Ok(evict)
    }

    /// The model's process is gone (crashed, failed to start): its memory is free, whatever is
    /// still counted in flight on it (those requests fail on their own).
    pub(crate) fn force_unload(&mut self, id: usize) {
        self.not_resident(id);
    }

    pub(crate) fn release(&mut self, id: usize, now: Instant) {
        let e = &mut self.entries[id];
        e.in_flight = e.in_flight.saturating_sub(1);
        e.last_used = Some(now);
    }

    /// Marks entry `id` as no longer loaded (the pool stopped it). Refused while in use.
    pub(crate) fn unload(&mut self, id: usize) -> bool {
        let e = &mut self.entries[id];
        if e.in_flight > 0 {
            return false;
        }
        self.not_resident(id);
        true
    }

    /// How many times entry `id` stopped being resident (0 for an unknown one).
    pub(crate) fn unloads(&self, id: usize) -> u64 {
        self.entries.get(id).map_or(0, |e| e.unloads)
    }

    fn not_resident(&mut self, id: usize) {
        let e = &mut self.entries[id];
        if e.resident {
            e.unloads += 1;
        }
        e.resident = false;
    }
}
