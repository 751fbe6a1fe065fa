//! Routing: which deployment of a model a request should run on, under the model's policy.
//!
//! Pure: takes a snapshot of the deployments (slots, observed latency, price, memory verdicts)
//! and returns a choice, a reason to wait, or a reason to reject. No I/O, no clock reads, no
//! locks; randomness (for the power of two choices), the round-robin turn and the affinity
//! policies' preferred deployment (judged by the caller from what it remembers of earlier
//! requests) come in as [`Draw`].

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::reason::RejectReason;

/// A model's routing policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Policy {
    /// Only local deployments (and simulators).
    LocalOnly,
    /// Only cloud deployments.
    CloudOnly,
    /// Local if admitted now, else cloud; wait if neither.
    #[default]
    LocalFirst,
    /// The deployment with the lowest expected time to first byte.
    Latency,
    /// The cheapest deployment admitted now; waits for a cheaper one up to a bound.
    Cost,
    /// The highest-precision local variant admitted now, else cloud.
    DegradationLadder,
    /// The free deployment with the fewest requests in flight.
    LeastLoad,
    /// The free deployments in turn.
    RoundRobin,
    /// The deployment that was sent the longest prefix of the prompt (its KV cache likely
    /// holds it) unless it is busier than the least-loaded by more than the balance
    /// threshold; else least-load.
    PrefixAware,
    /// A session (`x-mofa-session`, else the body's `user`) stays on the deployment it ran
    /// on while that one is free, healthy and within the balance threshold; else least-load.
    Session,
}

impl Policy {
    /// It routes by what the gateway remembers of earlier requests (a prefix, a session).
    pub(crate) fn has_affinity(self) -> bool {
        matches!(self, Policy::PrefixAware | Policy::Session)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Policy::LocalOnly => "local-only",
            Policy::CloudOnly => "cloud-only",
            Policy::LocalFirst => "local-first",
            Policy::Latency => "latency",
            Policy::Cost => "cost",
            Policy::DegradationLadder => "degradation-ladder",
            Policy::LeastLoad => "least-load",
            Policy::RoundRobin => "round-robin",
            Policy::PrefixAware => "prefix-aware",
            Policy::Session => "session",
        })
    }
}

/// Why a deployment cannot take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Block {
    /// Every slot is taken: wait for one.
    Full,
    /// Its model would load into the defer band: wait for memory.
    MemoryDefer,
    /// Its model would load above the reject threshold.
    MemoryExhausted,
    /// Its model is larger than the whole memory budget: never.
    TooLarge,
    /// Not to be tried now: its breaker is open, it is cooling down, or this request already
    /// failed on it.
    Unavailable,
}

/// What routing needs to know of one deployment.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub local: bool,
    /// Precision rank for the ladder: 0 is the highest precision; equal ranks are equivalent.
    pub rank: usize,
    pub in_flight: u32,
    /// `None` when it can take the request now.
    pub block: Option<Block>,
    /// Price per 1k tokens (local: 0).
    pub price: f64,
    /// Observed time to first byte (EWMA), if any.
    pub ttfb_ms: Option<f64>,
    /// Expected wait for a slot here when full, in ms.
    pub wait_ms: f64,
}

/// Routing's answer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Route {
    Run(usize),
    /// Nothing can run it now, but something may soon; `memory` when memory is the reason.
    Wait {
        memory: bool,
    },
    /// Nothing can ever, or for now nothing may: the reason says which.
    Reject(RejectReason),
}

/// What a decision draws on beyond the candidates.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Draw {
    /// A random number (the power of two choices).
    pub rng: u64,
    /// The deployment whose turn it is (the one after the last chosen): round-robin's next,
    /// and how least-load breaks ties (in turn, so that equal deployments alternate).
    pub turn: usize,
    /// The affinity policies: the deployment the request belongs on, if any (already judged
    /// against the balance threshold); taken when it is free, else least-load decides.
    pub preferred: Option<usize>,
    /// How long the cost policy waits for a cheaper deployment before paying for a dearer one.
    pub cost_wait_ms: f64,
}

/// Picks a deployment for a request under `policy`.
pub(crate) fn route(policy: Policy, c: &[Candidate], draw: &Draw) -> Route {
    let Draw {
        rng,
        turn,
        preferred,
        cost_wait_ms,
    } = *draw;
    let eligible: Vec<usize> = (0..c.len())
        .filter(|&i| match policy {
            Policy::LocalOnly => c[i].local,
            Policy::CloudOnly => !c[i].local,
            _ => true,
        })
        .filter(|&i| c[i].block != Some(Block::Unavailable))
        .collect();
    if eligible.is_empty() {
        return Route::Reject(RejectReason::NoHealthyBackend);
    }
    let free_in = |pred: &dyn Fn(usize) -> bool| {
        p2c(
            c,
            eligible.iter().copied().filter(|&i| pred(i) && free(c, i)),
            rng,
        )
    };
    let cloud = || free_in(&|i| !c[i].local);
    let pick = match policy {
        Policy::LocalOnly | Policy::CloudOnly => free_in(&|_| true),
        Policy::LocalFirst => free_in(&|i| c[i].local).or_else(cloud),
        Policy::DegradationLadder => ladder(c, &eligible, rng).or_else(cloud),
        Policy::Latency => fastest(c, &eligible),
        Policy::Cost => cheapest(c, &eligible, rng, cost_wait_ms),
        Policy::LeastLoad => least_load(c, &eligible, turn),
        Policy::RoundRobin => in_turn(c, eligible.iter().copied().filter(|&i| free(c, i)), turn),
        Policy::PrefixAware | Policy::Session => preferred
            .filter(|&i| eligible.contains(&i) && free(c, i))
            .or_else(|| least_load(c, &eligible, turn)),
    };
    match pick {
        Some(i) => Route::Run(i),
        None => why_not(policy, c, &eligible),
    }
}

fn free(c: &[Candidate], i: usize) -> bool {
    c[i].block.is_none()
}

/// The free deployment with the fewest in flight; ties taken in turn (so that equal
/// deployments share the traffic rather than the first taking it all).
fn least_load(c: &[Candidate], eligible: &[usize], turn: usize) -> Option<usize> {
    let free = || eligible.iter().copied().filter(|&i| free(c, i));
    let least = free().map(|i| c[i].in_flight).min()?;
    in_turn(c, free().filter(|&i| c[i].in_flight == least), turn)
}

/// Of `pool`, the first at or after `turn` in the list's order (wrapping around).
fn in_turn(c: &[Candidate], pool: impl Iterator<Item = usize>, turn: usize) -> Option<usize> {
    let n = c.len().max(1);
    pool.min_by_key(|&i| (i + n - turn % n) % n)
}

/// The highest-precision local rank with a free deployment (p2c within the rank).
fn ladder(c: &[Candidate], eligible: &[usize], rng: u64) -> Option<usize> {
    let mut ranks: Vec<usize> = eligible
        .iter()
        .filter(|&&i| c[i].local)
        .map(|&i| c[i].rank)
        .collect();
    ranks.sort_unstable();
    ranks.dedup();
    ranks.into_iter().find_map(|r| {
        let same_rank = eligible
            .iter()
            .copied()
            .filter(|&i| c[i].local && c[i].rank == r && free(c, i));
        p2c(c, same_rank, rng)
    })
}

/// The deployment with the lowest expected time to first byte, if it is free now (else wait
/// for it). Expected time = wait for a slot (0 when free) + observed time to first byte; a
/// deployment never observed counts as 0, so that each is tried.
fn fastest(c: &[Candidate], eligible: &[usize]) -> Option<usize> {
    let expected =
        |i: usize| c[i].ttfb_ms.unwrap_or(0.0) + if free(c, i) { 0.0 } else { c[i].wait_ms };
    eligible
        .iter()
        .copied()
        .filter(|&i| matches!(c[i].block, None | Some(Block::Full)))
        .min_by(|&a, &b| {
            expected(a)
                .total_cmp(&expected(b))
                .then(c[a].in_flight.cmp(&c[b].in_flight))
        })
        .filter(|&i| free(c, i))
}

/// The cheapest free deployment (p2c among equal prices), unless a cheaper full one is expected
/// to free up within `cost_wait_ms`: then wait for it.
fn cheapest(c: &[Candidate], eligible: &[usize], rng: u64, cost_wait_ms: f64) -> Option<usize> {
    let mut by_price: Vec<usize> = eligible.to_vec();
    by_price.sort_by(|&a, &b| c[a].price.total_cmp(&c[b].price));
    for (n, &i) in by_price.iter().enumerate() {
        if free(c, i) {
            let same = by_price[n..]
                .iter()
                .copied()
                .filter(|&j| c[j].price == c[i].price && free(c, j));
            return p2c(c, same, rng);
        }
        if c[i].block == Some(Block::Full) && c[i].wait_ms <= cost_wait_ms {
            return None;
        }
    }
    None
}

/// Nothing was picked: wait (for a slot or for memory) or reject, and why.
fn why_not(policy: Policy, c: &[Candidate], eligible: &[usize]) -> Route {
    let blocks = || eligible.iter().filter_map(|&i| c[i].block);
    if blocks().any(|b| b == Block::Full)
        || policy == Policy::Cost && eligible.iter().any(|&i| c[i].block.is_none())
    {
        Route::Wait { memory: false }
    } else if blocks().any(|b| b == Block::MemoryDefer) {
        Route::Wait { memory: true }
    } else if blocks().all(|b| b == Block::TooLarge) {
        Route::Reject(RejectReason::ModelTooLarge)
    } else {
        Route::Reject(RejectReason::MemoryExhausted)
    }
}

/// Power of two choices: of two candidates drawn at random, the one with fewer in flight.
fn p2c(c: &[Candidate], pool: impl Iterator<Item = usize>, rng: u64) -> Option<usize> {
    let pool: Vec<usize> = pool.collect();
    match pool.len() {
        0 => None,
        1 => Some(pool[0]),
        n => {
            let a = pool[(rng % n as u64) as usize];
            let mut b = pool[((rng >> 32) % (n as u64 - 1)) as usize];
            if b == a {
                b = pool[n - 1];
            }
            Some(if c[b].in_flight < c[a].in_flight {
                b
            } else {
                a
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(policy: Policy, c: &[Candidate], rng: u64, cost_wait_ms: f64) -> Route {
        let draw = Draw {
            rng,
            cost_wait_ms,
            ..Draw::default()
        };
        route(policy, c, &draw)
    }

    fn cand(local: bool, block: Option<Block>) -> Candidate {
        Candidate {
            local,
            rank: 0,
            in_flight: 0,
            block,
            price: if local { 0.0 } else { 1.0 },
            ttfb_ms: None,
            wait_ms: 1000.0,
        }
    }

    #[test]
    fn local_first_falls_back_to_cloud_then_waits() {
        let free = [cand(true, None), cand(false, None)];
        assert_eq!(rt(Policy::LocalFirst, &free, 7, 0.0), Route::Run(0));
        let local_full = [cand(true, Some(Block::Full)), cand(false, None)];
        assert_eq!(rt(Policy::LocalFirst, &local_full, 7, 0.0), Route::Run(1));
        let both_full = [
            cand(true, Some(Block::Full)),
            cand(false, Some(Block::Full)),
        ];
        assert_eq!(
            rt(Policy::LocalFirst, &both_full, 7, 0.0),
            Route::Wait { memory: false }
        );
        let deferred = [cand(true, Some(Block::MemoryDefer)), cand(false, None)];
        assert_eq!(rt(Policy::LocalFirst, &deferred, 7, 0.0), Route::Run(1));
    }

    #[test]
    fn only_policies_never_cross() {
        let c = [cand(true, Some(Block::Full)), cand(false, None)];
        assert_eq!(
            rt(Policy::LocalOnly, &c, 1, 0.0),
            Route::Wait { memory: false }
        );
        let c = [cand(true, None), cand(false, Some(Block::Full))];
        assert_eq!(
            rt(Policy::CloudOnly, &c, 1, 0.0),
            Route::Wait { memory: false }
        );
        assert_eq!(
            rt(Policy::CloudOnly, &[cand(true, None)], 1, 0.0),
            Route::Reject(RejectReason::NoHealthyBackend)
        );
    }

    #[test]
    fn memory_reasons() {
        assert_eq!(
            rt(
                Policy::LocalOnly,
                &[cand(true, Some(Block::TooLarge))],
                1,
                0.0
            ),
            Route::Reject(RejectReason::ModelTooLarge)
        );
        assert_eq!(
            rt(
                Policy::LocalOnly,
                &[cand(true, Some(Block::MemoryExhausted))],
                1,
                0.0
            ),
            Route::Reject(RejectReason::MemoryExhausted)
        );
        assert_eq!(
            rt(
                Policy::LocalOnly,
                &[cand(true, Some(Block::MemoryDefer))],
                1,
                0.0
            ),
            Route::Wait { memory: true }
        );
        // Too large locally but a cloud deployment exists: that one is waited for.
        let c = [
            cand(true, Some(Block::TooLarge)),
            cand(false, Some(Block::Full)),
        ];
        assert_eq!(
            rt(Policy::LocalFirst, &c, 1, 0.0),
            Route::Wait { memory: false }
        );
    }

    #[test]
    fn ladder_steps_down_by_precision_then_cloud() {
        let mut c = vec![
            cand(true, None),
            cand(true, None),
            cand(true, None),
            cand(false, None),
        ];
        for (i, x) in c.iter_mut().take(3).enumerate() {
            x.rank = i;
        }
        assert_eq!(rt(Policy::DegradationLadder, &c, 3, 0.0), Route::Run(0));
        c[0].block = Some(Block::MemoryExhausted);
        assert_eq!(rt(Policy::DegradationLadder, &c, 3, 0.0), Route::Run(1));
        c[1].block = Some(Block::MemoryDefer);
        assert_eq!(rt(Policy::DegradationLadder, &c, 3, 0.0), Route::Run(2));
        c[2].block = Some(Block::Full);
        assert_eq!(rt(Policy::DegradationLadder, &c, 3, 0.0), Route::Run(3));
    }

    #[test]
    fn latency_prefers_the_fastest_observed() {
        let mut c = vec![cand(true, None), cand(false, None)];
        c[0].ttfb_ms = Some(50.0);
        c[1].ttfb_ms = Some(20.0);
        assert_eq!(rt(Policy::Latency, &c, 0, 0.0), Route::Run(1));
        // Full, and its expected wait makes it slower than the other.
        c[1].block = Some(Block::Full);
        assert_eq!(rt(Policy::Latency, &c, 0, 0.0), Route::Run(0));
        // Full but barely: better to wait for it.
        c[1].wait_ms = 5.0;
        assert_eq!(
            rt(Policy::Latency, &c, 0, 0.0),
            Route::Wait { memory: false }
        );
    }

    #[test]
    fn cost_waits_for_cheap_up_to_a_bound() {
        let c = [cand(true, Some(Block::Full)), cand(false, None)];
        assert_eq!(
            rt(Policy::Cost, &c, 0, 2000.0),
            Route::Wait { memory: false }
        );
        assert_eq!(rt(Policy::Cost, &c, 0, 10.0), Route::Run(1));
        let c = [cand(false, None), cand(true, None)];
        assert_eq!(rt(Policy::Cost, &c, 0, 0.0), Route::Run(1));
    }

    #[test]
    fn p2c_prefers_fewer_in_flight() {
        let mut c = vec![cand(true, None), cand(true, None)];
        c[0].in_flight = 5;
        for rng in 0..64 {
            assert_eq!(p2c(&c, 0..2, rng), Some(1));
        }
        let c: Vec<Candidate> = (0..5).map(|_| cand(true, None)).collect();
        for rng in 0..1000u64 {
            assert!(p2c(&c, 0..5, rng.wrapping_mul(0x9e3779b97f4a7c15)).unwrap() < 5);
        }
    }

    #[test]
    fn least_load_takes_the_fewest_in_flight_and_spreads_ties() {
        let mut c = vec![cand(true, None), cand(true, None), cand(false, None)];
        c[0].in_flight = 3;
        c[1].in_flight = 1;
        c[2].in_flight = 2;
        assert_eq!(rt(Policy::LeastLoad, &c, 0, 0.0), Route::Run(1));
        c[1].block = Some(Block::Full);
        assert_eq!(rt(Policy::LeastLoad, &c, 0, 0.0), Route::Run(2));
        // Ties: taken in turn.
        let c = vec![cand(true, None), cand(true, None), cand(true, None)];
        for turn in 0..6 {
            let draw = Draw {
                turn,
                ..Draw::default()
            };
            assert_eq!(route(Policy::LeastLoad, &c, &draw), Route::Run(turn % 3));
        }
        let full = [cand(true, Some(Block::Full))];
        assert_eq!(
            rt(Policy::LeastLoad, &full, 0, 0.0),
            Route::Wait { memory: false }
        );
    }

    #[test]
    fn round_robin_takes_turns_and_skips_the_busy() {
        let mut c = vec![cand(true, None), cand(true, None), cand(true, None)];
        let at = |c: &[Candidate], turn| {
            let draw = Draw {
                turn,
                ..Draw::default()
            };
            route(Policy::RoundRobin, c, &draw)
        };
        assert_eq!(at(&c, 0), Route::Run(0));
        assert_eq!(at(&c, 1), Route::Run(1));
        assert_eq!(at(&c, 2), Route::Run(2));
        assert_eq!(at(&c, 3), Route::Run(0));
        c[1].block = Some(Block::Full);
        assert_eq!(at(&c, 1), Route::Run(2), "the next free one after the busy");
        c[0].block = Some(Block::Unavailable);
        c[2].block = Some(Block::Full);
        assert_eq!(at(&c, 2), Route::Wait { memory: false });
    }

    #[test]
    fn affinity_policies_take_the_preferred_when_free_else_least_load() {
        let mut c = vec![cand(true, None), cand(true, None)];
        c[0].in_flight = 2;
        for policy in [Policy::PrefixAware, Policy::Session] {
            let with = |c: &[Candidate], preferred| {
                let draw = Draw {
                    preferred,
                    ..Draw::default()
                };
                route(policy, c, &draw)
            };
            assert_eq!(with(&c, Some(0)), Route::Run(0), "{policy}");
            assert_eq!(with(&c, None), Route::Run(1), "{policy}");
            // A preference for a busy, broken or unknown deployment falls to least-load.
            let mut busy = c.clone();
            busy[0].block = Some(Block::Full);
            assert_eq!(with(&busy, Some(0)), Route::Run(1), "{policy}");
            busy[0].block = Some(Block::Unavailable);
            assert_eq!(with(&busy, Some(0)), Route::Run(1), "{policy}");
            assert_eq!(with(&c, Some(9)), Route::Run(1), "{policy}");
        }
    }
}
