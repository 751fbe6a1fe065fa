//! The bounded priority queue of one model: served by priority, then arrival; when full, the
//! least important newest waiter makes room for a more important newcomer.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::time::Instant;

use super::Priority;

// ---------------------------------------------------------------------------------------------
// The wait queue

/// Where a waiter stands: higher priority first, then earlier arrival.
pub(crate) type WaitKey = (Reverse<Priority>, u64);

/// A bounded priority queue of waiters, served by priority then arrival. When full, the
/// lowest-priority newest waiter is shed for a newcomer of higher priority.
#[derive(Debug)]
pub(crate) struct WaitQueue<T> {
    cap: usize,
    next_seq: u64,
    pub(super) items: BTreeMap<WaitKey, (Instant, T)>,
    /// Waiters per priority (`Priority as usize`), kept with `items`: `ahead_of` is asked at
    /// every admission and must not walk the queue.
    counts: [usize; 4],
}

/// What happened to a newcomer.
#[derive(Debug)]
pub(crate) enum Push<T> {
    Queued(WaitKey),
    /// Queued, and this waiter was shed to make room.
    Displaced(WaitKey, T),
    /// The queue is full of waiters at least as important: the newcomer is turned away.
    Full(T),
}

impl<T> WaitQueue<T> {
    pub(crate) fn new(cap: usize) -> Self {
        WaitQueue {
            cap,
            next_seq: 0,
            items: BTreeMap::new(),
            counts: [0; 4],
        }
    }

    /// A new bound (a reload): waiters beyond a lower one stay, newcomers wait for room.
    pub(crate) fn set_cap(&mut self, cap: usize) {
        self.cap = cap;
    }

    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    pub(crate) fn push(&mut self, prio: Priority, deadline: Instant, item: T) -> Push<T> {
        let key = (Reverse(prio), self.next_seq);
        self.next_seq += 1;
        if self.items.len() < self.cap {
            self.items.insert(key, (deadline, item));
            self.counts[prio as usize] += 1;
            return Push::Queued(key);
        }
        let worst_is_less = self
            .items
            .last_key_value()
            .is_some_and(|(&(Reverse(worst), _), _)| worst < prio);
        if worst_is_less {
            if let Some(((Reverse(worst), _), (_, shed))) = self.items.pop_last() {
                self.counts[worst as usize] -= 1;
                self.items.insert(key, (deadline, item));
                self.counts[prio as usize] += 1;
                return Push::Displaced(key, shed);
            }
        }
        Push::Full(item)
    }

    /// The first waiter in service order.
    pub(crate) fn peek(&self) -> Option<(WaitKey, Instant)> {
        self.items.first_key_value().map(|(k, (d, _))| (*k, *d))
    }

    /// The first waiter in service order, to change in place.
    pub(crate) fn first_mut(&mut self) -> Option<&mut T> {
        self.items.first_entry().map(|e| &mut e.into_mut().1)
    }

    pub(crate) fn pop(&mut self) -> Option<(WaitKey, T)> {
        let (k, (_, t)) = self.items.pop_first()?;
        self.counts[k.0 .0 as usize] -= 1;
        Some((k, t))
    }

    pub(crate) fn remove(&mut self, key: &WaitKey) -> Option<T> {
        let (_, t) = self.items.remove(key)?;
        self.counts[key.0 .0 as usize] -= 1;
        Some(t)
    }

    /// How many wait ahead of a newcomer of priority `prio` (all of at least that priority).
    pub(crate) fn ahead_of(&self, prio: Priority) -> usize {
        self.counts[prio as usize..].iter().sum()
    }

    /// Waiters per priority, lowest first.
    pub(crate) fn depth_by_priority(&self) -> [usize; 4] {
        self.counts
    }

    /// Removes and returns every waiter whose deadline is at or before `now`.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<T> {
        let late: Vec<WaitKey> = self
            .items
            .iter()
            .filter(|(_, (d, _))| *d <= now)
            .map(|(k, _)| *k)
            .collect();
        late.iter().filter_map(|k| self.remove(k)).collect()
    }
}
