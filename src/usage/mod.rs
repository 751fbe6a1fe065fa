//! The usage ledger: one [`UsageRecord`] per finished request (from the observe phase's one
//! record), with its tokens and cost, written to a database without slowing any request.
//!
//! Owns the bounded queue between the request path and the writer, the writer task (batches
//! of at most [`MAX_BATCH`] rows, at least every `flush_interval_ms`), the count of records
//! dropped when the queue is full, and the flush at shutdown. The stores are behind [`Store`]
//! (`sqlite`, the embedded default); their schemas are versioned migrations run at start.
//! It must not block or wait on the request path (a full queue drops and counts, never
//! waits), must not see a prompt, a completion or a key (a key is its configured name), and
//! must not decide budgets: it tells `budget` what was spent (at once) and what the store
//! holds (when a batch commits, in the same transaction as the spend table, and every
//! `budget_sync_ms`, what other replicas spent).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use tokio::sync::mpsc;

use crate::config::{UsageConfig, UsageStore};

mod counters;
mod postgres;
mod record;
pub(crate) mod report;
mod sqlite;

use crate::budget::{Budgets, Period, SpendDelta, SpendTotal};

pub(crate) use record::{Prices, UsageRecord};
pub(crate) use report::{Format, Query, Report};

/// Most rows one insert carries.
pub(crate) const MAX_BATCH: usize = 2000;

/// A boxed future of a store.
pub(crate) type Fut<T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>>;

/// What an insert returns: the spend table's totals after it, one per delta and in their
/// order; `Err` gives the batch back (nothing of it was written), with why.
pub(crate) type Inserting = Fut<Result<Vec<SpendTotal>, (String, Vec<UsageRecord>)>>;

/// A database the ledger writes to.
pub(crate) trait Store: Send + Sync {
    /// Inserts `batch` into `usage_records` and adds `spend` (its [`crate::budget::deltas`])
    /// to `usage_spend`, in one transaction; on `Err` nothing of it was written and the
    /// writer tries it again.
    fn insert(&self, batch: Vec<UsageRecord>, spend: Vec<SpendDelta>) -> Inserting;
    /// Every key's spend in the given periods.
    fn spend(&self, periods: Vec<(Period, String)>) -> Fut<Result<Vec<SpendTotal>, String>>;
    /// Reads a report from `usage_records` (on a connection of its own: the writer goes on).
    fn report(&self, q: Query) -> Fut<Result<Report, String>>;
}

/// The ledger's handle on the request path: a bounded queue to the writer.
pub(crate) struct Ledger {
    /// `None` once closed. Read without a lock (or a clone) on the request path.
    tx: ArcSwapOption<mpsc::Sender<UsageRecord>>,
    dropped: Arc<AtomicU64>,
    warned: AtomicBool,
    written: Arc<AtomicU64>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
    sync: tokio::task::JoinHandle<()>,
    budgets: Arc<Budgets>,
    store: Arc<dyn Store>,
    /// Every key's spend in the current day, month and in all, as the store said at the last
    /// re-read (the status page's spend panel).
    spent: Arc<ArcSwap<Vec<SpendTotal>>>,
    /// Budget counters in Redis (`[limits] store = "redis"`).
    counters: Option<Arc<counters::Counters>>,
}

/// Where budgets are counted between replicas besides the usage store: Redis's URL and
/// round-trip timeout, when `[limits] store = "redis"`.
pub(crate) type SharedCounters<'a> = Option<(&'a str, Duration)>;

/// Opens the configured store (running its migrations); `None` with `store = "off"`.
async fn open(cfg: &UsageConfig) -> Result<Option<Arc<dyn Store>>, String> {
    Ok(Some(match cfg.store {
        UsageStore::Off => return Ok(None),
        UsageStore::Sqlite => Arc::new(sqlite::Sqlite::open(&cfg.path).await?),
        UsageStore::Postgres => {
            Arc::new(postgres::Postgres::open(cfg.url.as_deref().unwrap_or_default()).await?)
        }
    }))
}

/// `mofa-gateway usage`: a report from the store `cfg` names, written as the `format`
/// parameter says (a table by default). `params` are `GET /admin/usage`'s (`from`, `to`,
/// `key`, `model`, `group_by`, `format`). `Err` when a parameter is wrong, the ledger is off
/// or the store cannot be read.
pub async fn report_text(cfg: &UsageConfig, params: &[(&str, &str)]) -> Result<String, String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64);
    let mut params = params.to_vec();
    if !params.iter().any(|(n, _)| *n == "format") {
        params.push(("format", "table"));
    }
    let (q, format) = Query::from_params(params, now).map_err(|(_, e)| e)?;
    let Some(store) = open(cfg).await? else {
        return Err(
            "the usage ledger is off: set [usage] store = \"sqlite\" or \"postgres\"".into(),
        );
    };
    Ok(store.report(q).await?.render(format))
}

impl Ledger {
    /// Opens the configured store (running its migrations) and starts the writer; `None`
    /// with `store = "off"`.
    /// `budgets` learns what is spent.
    pub(crate) async fn start(
        cfg: &UsageConfig,
        redis: SharedCounters<'_>,
        budgets: Arc<Budgets>,
    ) -> Result<Option<Ledger>, String> {
        let Some(store) = open(cfg).await? else {
            return Ok(None);
        };
        let counters = match redis {
            Some((url, timeout)) => Some(Arc::new(counters::Counters::start(
                url,
                timeout,
                budgets.clone(),
            )?)),
            None => None,
        };
        // What was spent before this start (and by other replicas) counts at once.
        let spent = Arc::new(ArcSwap::default());
        sync_once(&*store, counters.as_deref(), &budgets, &spent).await;
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        let written = Arc::new(AtomicU64::new(0));
        let every = Duration::from_millis(cfg.flush_interval_ms.clamp(1, 1000));
        let writer = tokio::spawn(write(
            store.clone(),
            rx,
            every,
            written.clone(),
            budgets.clone(),
        ));
        let sync_every = Duration::from_millis(cfg.budget_sync_ms.max(1));
        let sync = tokio::spawn(sync(
            store.clone(),
            counters.clone(),
            budgets.clone(),
            spent.clone(),
            sync_every,
        ));
        Ok(Some(Ledger {
            tx: ArcSwapOption::from_pointee(tx),
            dropped: Arc::new(AtomicU64::new(0)),
            warned: AtomicBool::new(false),
            written,
            writer: Mutex::new(Some(writer)),
            sync,
            budgets,
            store,
            spent,
            counters,
        }))
    }

    /// Queues `rec` for the writer; never waits. A full queue (the database is down or slow)
    /// drops it and counts it; the first drop is logged.
    pub(crate) fn push(&self, rec: UsageRecord) {
        let tx = self.tx.load();
        let Some(tx) = tx.as_deref() else { return };
        if let Some(key) = rec.key.as_deref() {
            // Counted against its budget now, whether or not the record reaches the store.
            let unix = rec
                .ts
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let tokens = rec.tokens_in.saturating_add(rec.tokens_out);
            if self.budgets.spend(key, unix, rec.cost, tokens) {
                if let (Some(c), Some(k)) = (&self.counters, &rec.key) {
                    c.add(k.clone(), unix, rec.cost, tokens);
                }
            }
        }
        if tx.try_send(rec).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "usage ledger: the queue is full (the database is down or slow); records \
                     are dropped and counted in mofa_gateway_usage_dropped_total"
                );
            }
        }
    }

    /// Reads a report (on a connection of its own).
    pub(crate) fn report(&self, q: Query) -> Fut<Result<Report, String>> {
        self.store.report(q)
    }

    /// Every key's spend in the current day, month and in all, as last read from the store.
    pub(crate) fn spent(&self) -> Arc<Vec<SpendTotal>> {
        self.spent.load_full()
    }

    /// Records dropped because the queue was full.
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Records written to the store.
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Shutdown: no more records; waits until the writer has written every queued one (or
    /// `grace` is over).
    pub(crate) async fn close(&self, grace: Duration) {
        self.tx.store(None);
        self.sync.abort();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = writer {
            if tokio::time::timeout(grace, w).await.is_err() {
                tracing::warn!("usage ledger: records still queued at exit were not written");
            }
        }
    }
}

/// The writer: takes what is queued, at most [`MAX_BATCH`] at a time, and inserts it every
/// `every` (sooner when a batch is full); a failed insert is retried with backoff while new
/// records wait in the queue. Ends when the queue is closed and empty.
async fn write(
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<UsageRecord>,
    every: Duration,
    written: Arc<AtomicU64>,
    budgets: Arc<Budgets>,
) {
    let insert = |batch: Vec<UsageRecord>| {
        let spend = deltas(&batch);
        let store = store.clone();
        let budgets = budgets.clone();
        async move {
            let totals = store.insert(batch, spend.clone()).await?;
            for (d, t) in spend.iter().zip(&totals) {
                budgets.committed(d, t);
            }
            Ok::<(), (String, Vec<UsageRecord>)>(())
        }
    };
    let mut batch: Vec<UsageRecord> = Vec::with_capacity(MAX_BATCH);
    let mut open = true;
    let mut failing = false;
    while open || !batch.is_empty() {
        if open && batch.len() < MAX_BATCH {
            let deadline = tokio::time::Instant::now() + every;
            while batch.len() < MAX_BATCH {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(r)) => batch.push(r),
                    Ok(None) => {
                        open = false;
                        break;
                    }
                    Err(_) => break,
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        let n = batch.len() as u64;
        match insert(std::mem::take(&mut batch)).await {
            Ok(()) => {
                written.fetch_add(n, Ordering::Relaxed);
                if failing {
                    tracing::info!("usage ledger: writing again");
                    failing = false;
                }
                batch = Vec::with_capacity(MAX_BATCH);
            }
            Err((e, back)) => {
                batch = back;
                if !failing {
                    tracing::warn!("usage ledger: cannot write ({e}); retrying");
                    failing = true;
                }
                if !open {
                    // Shutting down: one more try after a pause, then give up on this batch.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let n = batch.len();
                    match insert(std::mem::take(&mut batch)).await {
                        Ok(()) => {
                            written.fetch_add(n as u64, Ordering::Relaxed);
                        }
                        Err(_) => {
                            tracing::warn!(lost = n, "usage ledger: records not written at exit");
                        }
                    }
                } else {
                    tokio::time::sleep(every).await;
                }
            }
        }
    }
}

/// Reads what every key spent in the current periods from the store into `budgets` and
/// `spent`.
async fn sync_once(
    store: &dyn Store,
    counters: Option<&counters::Counters>,
    budgets: &Budgets,
    spent: &ArcSwap<Vec<SpendTotal>>,
) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    budgets.roll_all(now);
    match store.spend(budgets.labels(now)).await {
        Ok(totals) => {
            totals.iter().for_each(|t| budgets.synced(t));
            spent.store(Arc::new(totals));
        }
        Err(e) => tracing::debug!("usage ledger: cannot read the spend table ({e})"),
    }
    // After the database's totals: a Redis counter found empty is seeded with them.
    if let Some(c) = counters {
        c.sync(budgets, now).await;
    }
}

/// Every `every`, what other replicas spent.
async fn sync(
    store: Arc<dyn Store>,
    counters: Option<Arc<counters::Counters>>,
    budgets: Arc<Budgets>,
    spent: Arc<ArcSwap<Vec<SpendTotal>>>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sync_once(&*store, counters.as_deref(), &budgets, &spent).await;
    }
}

/// What a batch of records adds to each key's spend, one row per (key, period), sorted so
/// that concurrent writers lock the store's rows in one order.
pub(crate) fn deltas(batch: &[UsageRecord]) -> Vec<SpendDelta> {
    let mut out: HashMap<(Arc<str>, Period, String), (f64, u64)> = HashMap::new();
    for r in batch {
        let Some(key) = &r.key else { continue };
        let unix =
            r.ts.duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
        let tokens = r.tokens_in.saturating_add(r.tokens_out);
        for p in Period::ALL {
            let e = out
                .entry((key.clone(), p, p.window(unix).0))
                .or_insert((0.0, 0));
            e.0 += r.cost;
            e.1 = e.1.saturating_add(tokens);
        }
    }
    let mut v: Vec<SpendDelta> = out
        .into_iter()
        .map(|((key, period, label), (cost, tokens))| SpendDelta {
            key,
            period,
            label,
            cost,
            tokens,
        })
        .collect();
    v.sort_by(|a, b| {
        (&*a.key, a.period.as_str(), &a.label).cmp(&(&*b.key, b.period.as_str(), &b.label))
    });
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deltas_group_a_batch_by_key_and_period_in_a_stable_order() {
        let rec = |key: Option<&str>, cost: f64, tokens_in: u64| UsageRecord {
            request_id: axum::http::HeaderValue::from_static("r"),
            ts: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_798_758_000),
            key: key.map(Arc::from),
            model: None,
            deployment: None,
            priority: None,
            endpoint: "/v1/chat/completions",
            stream: false,
            status: 200,
            reason: "ok",
            attempts: 1,
            tokens_in,
            tokens_out: 1,
            tokens_estimated: false,
            cost_input: 0.0,
            cost_output: 0.0,
            cost,
            ttft_ms: None,
            total_ms: 1.0,
        };
        let d = deltas(&[
            rec(Some("b"), 1.0, 9),
            rec(None, 5.0, 5),
            rec(Some("a"), 0.5, 1),
            rec(Some("b"), 2.0, 19),
        ]);
        let rows: Vec<(&str, &str, &str, f64, u64)> = d
            .iter()
            .map(|d| {
                (
                    &*d.key,
                    d.period.as_str(),
                    d.label.as_str(),
                    d.cost,
                    d.tokens,
                )
            })
            .collect();
        assert_eq!(
            rows,
            vec![
                ("a", "day", "2026-12-31", 0.5, 2),
                ("a", "month", "2026-12", 0.5, 2),
                ("a", "total", "total", 0.5, 2),
                ("b", "day", "2026-12-31", 3.0, 30),
                ("b", "month", "2026-12", 3.0, 30),
                ("b", "total", "total", 3.0, 30),
            ]
        );
    }
}
