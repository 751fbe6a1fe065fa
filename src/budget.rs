//! Budgets: what a key may spend, in currency or in tokens, per UTC calendar period (`day`,
//! `month`) or in all (`total`), counted from the usage ledger.
//!
//! Owns the periods' arithmetic (labels and reset times, pure) and each budgeted key's view of
//! its spend: what the shared store said was spent (`shared`, raised by the ledger's writer
//! when it commits and by the periodic re-read of what other replicas spent) plus what this
//! gateway spent that is not committed yet (`pending`). A request is refused at admission
//! when the view has reached the budget, so a request that starts under budget may finish over
//! it. It must not do I/O: the ledger (`usage`) writes and reads the store and calls in here;
//! statuses are `error`'s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::{Budget, KeyConfig};
use crate::utc::{civil_from_days, days_from_civil};

pub(crate) use crate::config::Period;

impl Period {
    pub(crate) const ALL: [Period; 3] = [Period::Day, Period::Month, Period::Total];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
            Period::Total => "total",
        }
    }

    /// The period holding `unix_s`: its label (`2026-12-06`, `2026-12`, `total`) and when
    /// the next one starts (Unix seconds; `None` for `total`).
    pub(crate) fn window(self, unix_s: u64) -> (String, Option<u64>) {
        let days = unix_s / 86_400;
        let (y, m, d) = civil_from_days(days);
        match self {
            Period::Day => (format!("{y:04}-{m:02}-{d:02}"), Some((days + 1) * 86_400)),
            Period::Month => {
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                (
                    format!("{y:04}-{m:02}"),
                    Some(days_from_civil(ny, nm, 1) * 86_400),
                )
            }
            Period::Total => ("total".to_owned(), None),
        }
    }
}

impl Period {
    /// When the period holding `unix_s` started.
    fn start(self, unix_s: u64) -> u64 {
        let days = unix_s / 86_400;
        match self {
            Period::Day => days * 86_400,
            Period::Month => {
                let (y, m, _) = civil_from_days(days);
                days_from_civil(y, m, 1) * 86_400
            }
            Period::Total => 0,
        }
    }
}

/// RFC 3339 of a Unix second, for messages.
pub(crate) fn rfc3339(unix_s: u64) -> String {
    let (y, m, d) = civil_from_days(unix_s / 86_400);
    let r = unix_s % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        r / 3600,
        r / 60 % 60,
        r % 60
    )
}

/// What a batch of records adds to one key's spend in one period.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SpendDelta {
    pub key: Arc<str>,
    pub period: Period,
    pub label: String,
    pub cost: f64,
    pub tokens: u64,
}

/// One key's spend in one period as the store has it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct SpendTotal {
    pub key: String,
    pub period: Period,
    pub label: String,
    pub cost: f64,
    pub tokens: u64,
}

/// Spend of one key in one period, as this gateway knows it.
#[derive(Debug, Clone, Default)]
struct Tally {
    label: String,
    /// When this period started (Unix s).
    starts: u64,
    /// When the next period starts (Unix s); `None`: never (`total`).
    ends: Option<u64>,
    shared_cost: f64,
    shared_tokens: u64,
    pending_cost: f64,
    pending_tokens: u64,
    /// What the Redis counters said (every replica's spend as soon as each finished, this
    /// one's included), when `[limits] store = "redis"`.
    fast_cost: f64,
    fast_tokens: u64,
}

impl Tally {
    /// Moves to the period holding `now` when the current one is over.
    fn roll(&mut self, period: Period, now: u64) {
        if self.label.is_empty() || self.ends.is_some_and(|e| now >= e) {
            let (label, ends) = period.window(now);
            *self = Tally {
                label,
                starts: period.start(now),
                ends,
                ..Tally::default()
            };
        }
    }
    /// The spend: the database's view plus what this gateway has not committed, or the Redis
    /// counters' when they are ahead (another replica's recent spend). Each is a count of
    /// spend that happened, so the larger is the nearer.
    fn cost(&self) -> f64 {
        (self.shared_cost + self.pending_cost).max(self.fast_cost)
    }
    fn tokens(&self) -> u64 {
        self.shared_tokens
            .saturating_add(self.pending_tokens)
            .max(self.fast_tokens)
    }
}

/// A budgeted key's tallies, one per period.
#[derive(Debug, Default)]
struct Tallies([Tally; 3]);

fn ix(p: Period) -> usize {
    p as usize
}

/// One of a key's budgets and what it has spent: the one that refused a request, or (the
/// status page) any.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Over {
    /// `budget` (currency) or `token_budget`.
    pub tokens: bool,
    pub period: Period,
    pub amount: f64,
    pub spent: f64,
    /// When the period ends (Unix s); `None` for `total`.
    pub resets: Option<u64>,
}

/// A budgeted key's standing: for the currency budget and the token budget, (limit,
/// remaining, when the period ends); and the budget it has used up, if any.
#[derive(Debug, Default)]
pub(crate) struct Standing {
    pub left: [Option<(f64, f64, Option<u64>)>; 2],
    pub over: Option<Over>,
}

/// One key's budgets.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Limits {
    cost: Option<Budget>,
    tokens: Option<Budget>,
}

/// The spend views of every budgeted key. Keys are the configured ones (a bounded set);
/// a key that loses its budget on a reload keeps its tallies (for the status page) but is
/// no longer checked.
#[derive(Debug, Default)]
pub(crate) struct Budgets {
    /// Read on every request of a key; written by a reload.
    keys: arc_swap::ArcSwap<HashMap<Arc<str>, Budgeted>>,
}

/// A budgeted key: its budgets and its tallies.
type Budgeted = (Limits, Arc<Mutex<Tallies>>);

/// Locks a key's tallies (never across an `.await`; a poisoned lock is still consistent:
/// every update is a few field writes).
fn lock(t: &Mutex<Tallies>) -> std::sync::MutexGuard<'_, Tallies> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

impl Budgets {
    /// The budgets of `keys`; the tallies of keys already known are kept.
    pub(crate) fn configure(&self, keys: &[KeyConfig]) {
        let old = self.keys.load();
        let mut next = HashMap::new();
        for k in keys {
            if k.budget.is_none() && k.token_budget.is_none() {
                continue;
            }
            let tallies = old
                .get(k.name.as_str())
                .map(|(_, t)| t.clone())
                .unwrap_or_default();
            let limits = Limits {
                cost: k.budget,
                tokens: k.token_budget,
            };
            next.insert(Arc::from(k.name.as_str()), (limits, tallies));
        }
        self.keys.store(Arc::new(next));
    }

    /// Where `key` stands at `now` (Unix s), in one look at its tallies: what is left of
    /// each budget and, when one is used up, which (the currency budget is looked at first).
    /// `None` for a key without a budget.
    pub(crate) fn standing(&self, key: &str, now: u64) -> Option<Standing> {
        let keys = self.keys.load();
        let (limits, tallies) = keys.get(key)?;
        let mut t = lock(tallies);
        let mut out = Standing::default();
        for (i, b) in [limits.cost, limits.tokens].into_iter().enumerate() {
            let Some(b) = b else { continue };
            let tally = &mut t.0[ix(b.period)];
            tally.roll(b.period, now);
            let tokens = i == 1;
            let spent = if tokens {
                tally.tokens() as f64
            } else {
                tally.cost()
            };
            out.left[i] = Some((b.amount, (b.amount - spent).max(0.0), tally.ends));
            if spent >= b.amount && out.over.is_none() {
                out.over = Some(Over {
                    tokens,
                    period: b.period,
                    amount: b.amount,
                    spent,
                    resets: tally.ends,
                });
            }
        }
        Some(out)
    }

    #[cfg(test)]
    fn check(&self, key: &str, now: u64) -> Option<Over> {
        self.standing(key, now).and_then(|s| s.over)
    }

    #[cfg(test)]
    fn remaining(&self, key: &str, now: u64) -> [Option<(f64, f64, Option<u64>)>; 2] {
        self.standing(key, now).map(|s| s.left).unwrap_or_default()
    }

    /// This gateway spent `cost` and `tokens` for `key` at `unix_s`, not committed yet.
    /// Whether `key` has a budget.
    pub(crate) fn spend(&self, key: &str, unix_s: u64, cost: f64, tokens: u64) -> bool {
        let keys = self.keys.load();
        let Some((_, tallies)) = keys.get(key) else {
            return false;
        };
        let mut t = lock(tallies);
        for p in Period::ALL {
            let tally = &mut t.0[ix(p)];
            tally.roll(p, unix_s);
            // A record of an earlier period (it finished before the tally rolled) is not this one's.
            if unix_s >= tally.starts {
                tally.pending_cost += cost;
                tally.pending_tokens = tally.pending_tokens.saturating_add(tokens);
            }
        }
        true
    }

    /// The Redis counters say `total` (every replica's spend, counted as each finished).
    pub(crate) fn counted(&self, total: &SpendTotal) {
        let keys = self.keys.load();
        let Some((_, tallies)) = keys.get(total.key.as_str()) else {
            return;
        };
        let mut t = lock(tallies);
        let tally = &mut t.0[ix(total.period)];
        if tally.label == total.label {
            tally.fast_cost = tally.fast_cost.max(total.cost);
            tally.fast_tokens = tally.fast_tokens.max(total.tokens);
        }
    }

    /// What is known to be counted of `key`'s spend in `period` labelled `label` (the
    /// database's, or the Redis counters' when ahead; not this gateway's pending spend, which
    /// is on its way to both), to seed an empty Redis counter with.
    pub(crate) fn stored(&self, key: &str, period: Period, label: &str) -> Option<(f64, u64)> {
        let keys = self.keys.load();
        let (_, tallies) = keys.get(key)?;
        let t = lock(tallies);
        let tally = &t.0[ix(period)];
        (tally.label == label).then_some((
            tally.shared_cost.max(tally.fast_cost),
            tally.shared_tokens.max(tally.fast_tokens),
        ))
    }

    /// The budgeted keys' names.
    pub(crate) fn names(&self) -> Vec<Arc<str>> {
        self.keys.load().keys().cloned().collect()
    }

    /// The ledger committed `delta`; the store's total after it is `total`.
    pub(crate) fn committed(&self, delta: &SpendDelta, total: &SpendTotal) {
        let keys = self.keys.load();
        let Some((_, tallies)) = keys.get(&delta.key) else {
            return;
        };
        let mut t = lock(tallies);
        let tally = &mut t.0[ix(delta.period)];
        if tally.label == delta.label {
            tally.pending_cost = (tally.pending_cost - delta.cost).max(0.0);
            tally.pending_tokens = tally.pending_tokens.saturating_sub(delta.tokens);
            tally.shared_cost = tally.shared_cost.max(total.cost);
            tally.shared_tokens = tally.shared_tokens.max(total.tokens);
        }
    }

    /// The store says `total` (this gateway's and other replicas' committed spend).
    pub(crate) fn synced(&self, total: &SpendTotal) {
        let keys = self.keys.load();
        let Some((_, tallies)) = keys.get(total.key.as_str()) else {
            return;
        };
        let mut t = lock(tallies);
        let tally = &mut t.0[ix(total.period)];
        if tally.label == total.label {
            tally.shared_cost = tally.shared_cost.max(total.cost);
            tally.shared_tokens = tally.shared_tokens.max(total.tokens);
        }
    }

    /// Every budgeted key's budgets at `now`, by key name (the status page): each as an
    /// [`Over`] whose `spent` may be under its `amount`.
    pub(crate) fn view(&self, now: u64) -> Vec<(Arc<str>, Vec<Over>)> {
        let keys = self.keys.load();
        let mut out: Vec<(Arc<str>, Vec<Over>)> = keys
            .iter()
            .map(|(name, (limits, tallies))| {
                let mut t = lock(tallies);
                let budgets = [(limits.cost, false), (limits.tokens, true)]
                    .into_iter()
                    .filter_map(|(b, tokens)| {
                        let b = b?;
                        let tally = &mut t.0[ix(b.period)];
                        tally.roll(b.period, now);
                        Some(Over {
                            tokens,
                            period: b.period,
                            amount: b.amount,
                            spent: if tokens {
                                tally.tokens() as f64
                            } else {
                                tally.cost()
                            },
                            resets: tally.ends,
                        })
                    })
                    .collect();
                (name.clone(), budgets)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The labels of the periods holding `now`, to read the store's totals with.
    pub(crate) fn labels(&self, now: u64) -> Vec<(Period, String)> {
        Period::ALL.iter().map(|p| (*p, p.window(now).0)).collect()
    }

    /// Makes sure every budgeted key's tallies are in the periods holding `now` (so a
    /// re-read matches their labels).
    pub(crate) fn roll_all(&self, now: u64) {
        for (_, tallies) in self.keys.load().values() {
            let mut t = lock(tallies);
            for p in Period::ALL {
                t.0[ix(p)].roll(p, now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_redis_counters_count_when_they_are_ahead_and_never_twice() {
        let b = Budgets::default();
        b.configure(&[key(
            "k",
            None,
            Some(Budget {
                amount: 100.0,
                period: Period::Day,
            }),
        )]);
        let now = 1_765_000_000;
        let label = Period::Day.window(now).0;
        let total = |tokens| SpendTotal {
            key: "k".into(),
            period: Period::Day,
            label: label.clone(),
            cost: 0.0,
            tokens,
        };
        assert!(b.spend("k", now, 0.0, 30));
        assert!(!b.spend("other", now, 0.0, 30));
        // Redis counted this replica's 30 and another's 50.
        b.counted(&total(80));
        assert_eq!(
            b.remaining("k", now)[1],
            Some((100.0, 20.0, Some((now / 86_400 + 1) * 86_400)))
        );
        // The database commits this replica's 30: no double count.
        let d = SpendDelta {
            key: "k".into(),
            period: Period::Day,
            label: label.clone(),
            cost: 0.0,
            tokens: 30,
        };
        b.committed(&d, &total(30));
        assert_eq!(b.remaining("k", now)[1].unwrap().1, 20.0);
        // The database is ahead of a Redis that restarted empty.
        b.synced(&total(90));
        b.counted(&total(5));
        assert_eq!(b.remaining("k", now)[1].unwrap().1, 10.0);
        assert_eq!(b.stored("k", Period::Day, &label), Some((0.0, 90)));
        assert_eq!(b.stored("k", Period::Day, "2001-01-01"), None);
        // A stale label is not this period's.
        b.counted(&SpendTotal {
            label: "2001-01-01".into(),
            ..total(1000)
        });
        assert!(b.check("k", now).is_none());
        b.counted(&total(100));
        assert!(b.check("k", now).is_some());
    }

    fn key(name: &str, budget: Option<Budget>, tokens: Option<Budget>) -> KeyConfig {
        let mut k: KeyConfig = toml::from_str(&format!(
            "name = \"{name}\"\nhash = \"sha256:{}\"",
            "ab".repeat(32)
        ))
        .unwrap();
        k.budget = budget;
        k.token_budget = tokens;
        k
    }

    const DEC_31_2026_23H: u64 = 1_798_758_000; // 2026-12-31T23:00:00Z

    #[test]
    fn periods_are_utc_calendar_days_and_months() {
        assert_eq!(rfc3339(DEC_31_2026_23H), "2026-12-31T23:00:00Z");
        let (l, end) = Period::Day.window(DEC_31_2026_23H);
        assert_eq!(l, "2026-12-31");
        assert_eq!(rfc3339(end.unwrap()), "2027-01-01T00:00:00Z");
        let (l, end) = Period::Month.window(DEC_31_2026_23H);
        assert_eq!(l, "2026-12");
        assert_eq!(rfc3339(end.unwrap()), "2027-01-01T00:00:00Z");
        // February of a leap year ends on the 29th.
        let feb_10_2028 = days_from_civil(2028, 2, 10) * 86_400;
        let (l, end) = Period::Month.window(feb_10_2028);
        assert_eq!(l, "2028-02");
        assert_eq!(rfc3339(end.unwrap()), "2028-03-01T00:00:00Z");
        assert_eq!(Period::Total.window(feb_10_2028), ("total".into(), None));
        assert_eq!(
            rfc3339(Period::Month.start(feb_10_2028)),
            "2028-02-01T00:00:00Z"
        );
        assert_eq!(
            rfc3339(Period::Day.start(DEC_31_2026_23H)),
            "2026-12-31T00:00:00Z"
        );
        for days in [0u64, 59, 365, 10_957, 20_000, 36_524, 100_000] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
        }
    }

    #[test]
    fn a_key_is_refused_once_its_view_reaches_the_budget_and_again_served_next_period() {
        let b = Budgets::default();
        let month = Budget {
            amount: 1.0,
            period: Period::Month,
        };
        let day_tokens = Budget {
            amount: 100.0,
            period: Period::Day,
        };
        b.configure(&[
            key("a", Some(month), Some(day_tokens)),
            key("free", None, None),
        ]);
        let now = DEC_31_2026_23H;
        assert_eq!(b.check("a", now), None);
        assert_eq!(b.check("free", now), None);
        b.spend("a", now, 0.6, 40);
        assert_eq!(b.check("a", now), None);
        b.spend("a", now, 0.5, 10);
        let over = b.check("a", now).unwrap();
        assert!(!over.tokens);
        assert_eq!(over.period, Period::Month);
        assert_eq!(over.resets, Some(DEC_31_2026_23H + 3600));
        // The next month (and day): a fresh budget.
        assert_eq!(b.check("a", now + 3600), None);
        b.spend("a", now + 3600, 0.0, 100);
        let over = b.check("a", now + 3600).unwrap();
        assert!(over.tokens);
        assert_eq!(over.spent, 100.0);
    }

    #[test]
    fn commits_move_spend_from_pending_to_shared_without_counting_it_twice() {
        let b = Budgets::default();
        let budget = Budget {
            amount: 10.0,
            period: Period::Day,
        };
        b.configure(&[key("a", Some(budget), None)]);
        let now = DEC_31_2026_23H;
        b.spend("a", now, 3.0, 0);
        let label = Period::Day.window(now).0;
        // Another replica committed 4 before this one's 3 arrived: the store says 7.
        let delta = SpendDelta {
            key: "a".into(),
            period: Period::Day,
            label: label.clone(),
            cost: 3.0,
            tokens: 0,
        };
        let total = |cost| SpendTotal {
            key: "a".into(),
            period: Period::Day,
            label: label.clone(),
            cost,
            tokens: 0,
        };
        b.committed(&delta, &total(7.0));
        assert_eq!(
            b.remaining("a", now)[0],
            Some((10.0, 3.0, Some(now + 3600)))
        );
        // An older re-read never lowers it.
        b.synced(&total(4.0));
        assert_eq!(b.remaining("a", now)[0].unwrap().1, 3.0);
        b.synced(&total(10.5));
        assert!(b.check("a", now).is_some());
        // A reload that keeps the key keeps what it spent; one that drops the budget frees it.
        b.configure(&[key("a", Some(budget), None)]);
        assert!(b.check("a", now).is_some());
        b.configure(&[key("a", None, None)]);
        assert_eq!(b.check("a", now), None);
    }
}
