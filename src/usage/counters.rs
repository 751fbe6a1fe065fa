//! Budget counters in Redis, when `[limits] store = "redis"`: every replica adds a budgeted
//! key's spend to one hash per (key, period) as soon as a request finishes (`HINCRBYFLOAT` /
//! `HINCRBY`, expiring after its period), and learns from the reply what every replica has
//! spent. So replicas see each other's spend within a round trip, not a database flush and a
//! re-read. The database stays the record: a counter found empty (Redis restarted without
//! persistence) is seeded with what the database holds, and budgets take whichever of the
//! two views is ahead (`budget`).
//!
//! Owns the connection, the bounded queue to it and the writer task. It must not wait on the
//! request path (a full queue or a Redis down skips the counter: the database still counts),
//! nor log the URL (it may hold a password).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::mpsc;

use crate::budget::{Budgets, Period, SpendTotal};

/// Spend queued for Redis at most.
const QUEUE: usize = 10_000;

/// A counter is kept this long after its period ends (a report may still read it).
const KEEP_AFTER_S: u64 = 2 * 86_400;

/// A counter: a key's spend in one period, by its label.
type Counter = (Arc<str>, Period, String);

/// One finished request of a budgeted key.
struct Spent {
    key: Arc<str>,
    unix_s: u64,
    cost: f64,
    tokens: u64,
}

/// The Redis counters' handle (see the module doc).
pub(super) struct Counters {
    tx: mpsc::Sender<Spent>,
    redis: Redis,
}

#[derive(Clone)]
struct Redis {
    client: redis::Client,
    timeout: Duration,
    conn: Arc<tokio::sync::Mutex<Option<ConnectionManager>>>,
}

/// The hash of `key`'s spend in the period labelled `label` (hash-tagged by key).
fn hash(key: &str, period: Period, label: &str) -> String {
    format!("mofa:{{b:{key}}}:spend:{}:{label}", period.as_str())
}

impl Redis {
    /// The connection, made when there is none (Redis may be down at start).
    async fn conn(&self) -> Result<ConnectionManager, String> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = tokio::time::timeout(self.timeout, self.client.get_connection_manager())
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| e.to_string())?;
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs `pipe`, within the timeout.
    async fn run<T: redis::FromRedisValue>(&self, pipe: &redis::Pipeline) -> Result<T, String> {
        let mut c = self.conn().await?;
        tokio::time::timeout(self.timeout, pipe.query_async(&mut c))
            .await
            .map_err(|_| "no answer".to_string())?
            .map_err(|e| e.to_string())
    }
}

impl Counters {
    /// Starts the writer; Redis need not be up yet.
    pub(super) fn start(
        url: &str,
        timeout: Duration,
        budgets: Arc<Budgets>,
    ) -> Result<Counters, String> {
        let client = redis::Client::open(url)
            .map_err(|_| "limits.redis_url: not a Redis URL".to_string())?;
        let redis = Redis {
            client,
            timeout,
            conn: Arc::default(),
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write(redis.clone(), rx, budgets));
        Ok(Counters { tx, redis })
    }

    /// Queues a budgeted key's spend; never waits (a full queue skips it).
    pub(super) fn add(&self, key: Arc<str>, unix_s: u64, cost: f64, tokens: u64) {
        let _ = self.tx.try_send(Spent {
            key,
            unix_s,
            cost,
            tokens,
        });
    }

    /// Reads every budgeted key's counters of the periods holding `now` into `budgets`, and
    /// seeds a missing one with what the database holds.
    pub(super) async fn sync(&self, budgets: &Budgets, now: u64) {
        let names = budgets.names();
        if names.is_empty() {
            return;
        }
        let mut pipe = redis::pipe();
        let mut asked = Vec::new();
        for key in &names {
            for p in Period::ALL {
                let label = p.window(now).0;
                if let Some((cost, tokens)) = budgets.stored(key, p, &label) {
                    let h = hash(key, p, &label);
                    // Seeds only an empty counter (both fields, or neither: one call each).
                    pipe.cmd("HSETNX").arg(&h).arg("cost").arg(cost).ignore();
                    pipe.cmd("HSETNX")
                        .arg(&h)
                        .arg("tokens")
                        .arg(tokens)
                        .ignore();
                    if let Some(ends) = p.window(now).1 {
                        pipe.cmd("EXPIREAT")
                            .arg(&h)
                            .arg(ends + KEEP_AFTER_S)
                            .ignore();
                    }
                }
                pipe.cmd("HMGET")
                    .arg(hash(key, p, &label))
                    .arg("cost")
                    .arg("tokens");
                asked.push((key.to_string(), p, label));
            }
        }
        match self.redis.run::<Vec<redis::Value>>(&pipe).await {
            Ok(values) => {
                for ((key, period, label), v) in asked.into_iter().zip(values) {
                    let Ok((cost, tokens)) =
                        redis::from_redis_value::<(Option<f64>, Option<u64>)>(&v)
                    else {
                        continue;
                    };
                    budgets.counted(&SpendTotal {
                        key,
                        period,
                        label,
                        cost: cost.unwrap_or(0.0),
                        tokens: tokens.unwrap_or(0),
                    });
                }
            }
            Err(e) => tracing::debug!("budget counters: cannot read Redis ({e})"),
        }
    }
}

/// The writer: takes what is queued (all of it at once), adds it up per counter, sends one
/// pipeline, and tells `budgets` the totals Redis answered. A failed send is not retried (the
/// database counts it; the next re-read catches up).
async fn write(redis: Redis, mut rx: mpsc::Receiver<Spent>, budgets: Arc<Budgets>) {
    let mut warned = false;
    while let Some(first) = rx.recv().await {
        let mut sums: HashMap<Counter, (f64, u64, Option<u64>)> = HashMap::new();
        let mut add = |s: Spent| {
            for p in Period::ALL {
                let (label, ends) = p.window(s.unix_s);
                let e = sums
                    .entry((s.key.clone(), p, label))
                    .or_insert((0.0, 0, ends));
                e.0 += s.cost;
                e.1 = e.1.saturating_add(s.tokens);
            }
        };
        add(first);
        while let Ok(s) = rx.try_recv() {
            add(s);
        }
        let sums: Vec<_> = sums.into_iter().collect();
        let mut pipe = redis::pipe();
        for ((key, p, label), (cost, tokens, ends)) in &sums {
            let h = hash(key, *p, label);
            pipe.cmd("HINCRBYFLOAT").arg(&h).arg("cost").arg(*cost);
            pipe.cmd("HINCRBY").arg(&h).arg("tokens").arg(*tokens);
            if let Some(ends) = ends {
                pipe.cmd("EXPIREAT")
                    .arg(&h)
                    .arg(ends + KEEP_AFTER_S)
                    .ignore();
            }
        }
        match redis.run::<Vec<redis::Value>>(&pipe).await {
            Ok(replies) => {
                warned = false;
                let totals = replies.chunks(2).map(|r| {
                    (
                        r.first()
                            .and_then(|v| redis::from_redis_value::<f64>(v).ok()),
                        r.get(1)
                            .and_then(|v| redis::from_redis_value::<u64>(v).ok()),
                    )
                });
                for (((key, period, label), (cost, tokens, _)), total) in
                    sums.into_iter().zip(totals)
                {
                    let (Some(total_cost), Some(total_tokens)) = total else {
                        continue;
                    };
                    // The first add to a counter Redis forgot: it starts from the database.
                    if total_tokens == tokens && (total_cost - cost).abs() < 1e-12 {
                        if let Some((c, t)) = budgets.stored(&key, period, &label) {
                            if c > 0.0 || t > 0 {
                                let mut seed = redis::pipe();
                                let h = hash(&key, period, &label);
                                seed.cmd("HINCRBYFLOAT").arg(&h).arg("cost").arg(c);
                                seed.cmd("HINCRBY").arg(&h).arg("tokens").arg(t);
                                if let Ok((c, t)) = redis.run::<(f64, u64)>(&seed).await {
                                    budgets.counted(&SpendTotal {
                                        key: key.to_string(),
                                        period,
                                        label,
                                        cost: c,
                                        tokens: t,
                                    });
                                }
                                continue;
                            }
                        }
                    }
                    budgets.counted(&SpendTotal {
                        key: key.to_string(),
                        period,
                        label,
                        cost: total_cost,
                        tokens: total_tokens,
                    });
                }
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(
                        "budget counters: cannot write to Redis ({e}); budgets are shared \
                         through the usage store until it answers"
                    );
                    warned = true;
                }
                // A connection that failed is made again on the next send.
                *redis.conn.lock().await = None;
            }
        }
    }
}
