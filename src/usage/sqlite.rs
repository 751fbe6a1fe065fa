//! The SQLite store: the embedded default (the SQLite bundled with `rusqlite`, a file, WAL
//! mode: the writer does not block readers such as `sqlite3` or a report). Its schema is the
//! versioned migrations of `migrations/sqlite` (`rusqlite_migration`: SQLite's
//! `user_version` says which have run), applied at open. The connection lives on the
//! blocking pool's threads (`spawn_blocking`), never on the runtime.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection};
use rusqlite_migration::{Migrations, M};

use super::report::{self, Bind, Query, Report, Row};
use super::{Fut, Inserting, Store, UsageRecord};
use crate::budget::{Period, SpendDelta, SpendTotal};

/// The schema's versions, in order; a new one is appended, never edited.
const MIGRATIONS: &[&str] = &[
    include_str!("../../migrations/sqlite/0001_usage_records.sql"),
    include_str!("../../migrations/sqlite/0002_usage_spend.sql"),
    include_str!("../../migrations/sqlite/0003_fewer_indexes.sql"),
];

const ADD_SPEND: &str = "INSERT INTO usage_spend (key, period, label, cost, tokens) \
    VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (key, period, label) DO UPDATE SET \
    cost = cost + excluded.cost, tokens = tokens + excluded.tokens RETURNING cost, tokens";

const INSERT: &str = "INSERT INTO usage_records (request_id, ts, key, model, deployment, \
    priority, endpoint, stream, status, reason, attempts, tokens_in, tokens_out, \
    tokens_estimated, cost_input, cost_output, cost, ttft_ms, total_ms) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)";

pub(super) struct Sqlite {
    conn: Arc<Mutex<Connection>>,
    /// Reports open their own read-only connection to it (WAL: the writer goes on).
    path: String,
}

impl Sqlite {
    /// Opens (creating it if needed) the database at `path` and brings its schema up to date.
    pub(super) async fn open(path: &str) -> Result<Sqlite, String> {
        let at = path.to_owned();
        let conn = tokio::task::spawn_blocking(move || open(&at))
            .await
            .map_err(|e| e.to_string())??;
        Ok(Sqlite {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_owned(),
        })
    }
}

fn open(path: &str) -> Result<Connection, String> {
    open_at(path, MIGRATIONS.len())
}

/// Opens `path` with the first `version` migrations run (a test makes an older database).
fn open_at(path: &str, version: usize) -> Result<Connection, String> {
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        format!("usage.path: cannot {what} the SQLite database {path}: {e}")
    };
    let mut conn = Connection::open(path).map_err(|e| fail("open", &e))?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(|e| fail("open", &e))?;
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(|e| fail("open", &e))?;
    conn.pragma_update(None, "synchronous", "NORMAL")
        .map_err(|e| fail("open", &e))?;
    Migrations::new(MIGRATIONS[..version].iter().map(|sql| M::up(sql)).collect())
        .to_latest(&mut conn)
        .map_err(|e| fail("migrate", &e))?;
    Ok(conn)
}

/// Inserts `batch` and adds `spend` in one transaction, one cached prepared statement a row;
/// returns the spend table's totals after it.
fn insert(
    conn: &mut Connection,
    batch: &[UsageRecord],
    spend: &[SpendDelta],
) -> rusqlite::Result<Vec<SpendTotal>> {
    let tx = conn.transaction()?;
    let mut totals = Vec::with_capacity(spend.len());
    {
        let mut st = tx.prepare_cached(INSERT)?;
        let mut ts = Vec::with_capacity(32);
        for r in batch {
            ts.clear();
            crate::utc::timestamp(r.ts, &mut ts);
            st.execute(params![
                r.request_id.to_str().unwrap_or_default(),
                std::str::from_utf8(&ts).unwrap_or_default(),
                r.key.as_deref(),
                r.model.as_deref(),
                r.deployment.as_deref(),
                r.priority,
                r.endpoint,
                r.stream,
                r.status,
                r.reason,
                r.attempts,
                i64::try_from(r.tokens_in).unwrap_or(i64::MAX),
                i64::try_from(r.tokens_out).unwrap_or(i64::MAX),
                r.tokens_estimated,
                r.cost_input,
                r.cost_output,
                r.cost,
                r.ttft_ms,
                r.total_ms,
            ])?;
        }
        // Prepared only when there is spend to add (a batch of unkeyed requests has none).
        if !spend.is_empty() {
            let mut add = tx.prepare_cached(ADD_SPEND)?;
            for d in spend {
                let tokens = i64::try_from(d.tokens).unwrap_or(i64::MAX);
                let (cost, tokens): (f64, i64) = add.query_row(
                    params![&*d.key, d.period.as_str(), d.label, d.cost, tokens],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )?;
                totals.push(SpendTotal {
                    key: d.key.to_string(),
                    period: d.period,
                    label: d.label.clone(),
                    cost,
                    tokens: u64::try_from(tokens).unwrap_or(0),
                });
            }
        }
    }
    tx.commit()?;
    Ok(totals)
}

/// Every key's spend in `periods`.
pub(super) fn spend(
    conn: &Connection,
    periods: &[(Period, String)],
) -> rusqlite::Result<Vec<SpendTotal>> {
    let mut st = conn.prepare_cached(
        "SELECT key, cost, tokens FROM usage_spend WHERE period = ?1 AND label = ?2",
    )?;
    let mut out = Vec::new();
    for (period, label) in periods {
        let rows = st.query_map(params![period.as_str(), label], |row| {
            Ok(SpendTotal {
                key: row.get(0)?,
                period: *period,
                label: label.clone(),
                cost: row.get(1)?,
                tokens: u64::try_from(row.get::<_, i64>(2)?).unwrap_or(0),
            })
        })?;
        for r in rows {
            out.push(r?);
        }
    }
    Ok(out)
}

/// Runs `q` on a read-only connection of its own.
fn report(path: &str, q: Query) -> rusqlite::Result<Report> {
    use rusqlite::types::Value;
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let (text, binds) = report::sql(&q, "substr(ts, 1, 10)", |n| format!("?{n}"));
    let time = |us: u64| {
        let mut out = Vec::with_capacity(32);
        crate::utc::timestamp(std::time::UNIX_EPOCH + Duration::from_micros(us), &mut out);
        Value::Text(String::from_utf8_lossy(&out).into_owned())
    };
    let values: Vec<Value> = binds
        .iter()
        .map(|b| match b {
            Bind::From => time(q.from_us.unwrap_or_default()),
            Bind::To => time(q.to_us.unwrap_or_default()),
            Bind::Key => Value::Text(q.key.clone().unwrap_or_default()),
            Bind::Model => Value::Text(q.model.clone().unwrap_or_default()),
        })
        .collect();
    let groups = q.group_by.len();
    let mut st = conn.prepare(&text)?;
    let rows = st
        .query_map(rusqlite::params_from_iter(values), |r| {
            let count = |i| r.get::<_, i64>(i).map(|v| u64::try_from(v).unwrap_or(0));
            Ok(Row {
                groups: (0..groups)
                    .map(|i| r.get::<_, Option<String>>(i))
                    .collect::<rusqlite::Result<_>>()?,
                requests: count(groups)?,
                failed: count(groups + 1)?,
                tokens_in: count(groups + 2)?,
                tokens_out: count(groups + 3)?,
                cost: r.get(groups + 4)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<Row>>>()?;
    Ok(Report::new(q, rows))
}

impl Store for Sqlite {
    fn insert(&self, batch: Vec<UsageRecord>, spend: Vec<SpendDelta>) -> Inserting {
        let conn = self.conn.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
                insert(&mut c, &batch, &spend).map_err(|e| (e.to_string(), batch))
            })
            .await
            .unwrap_or_else(|e| Err((e.to_string(), Vec::new())))
        })
    }

    fn spend(&self, periods: Vec<(Period, String)>) -> Fut<Result<Vec<SpendTotal>, String>> {
        let conn = self.conn.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let c = conn.lock().unwrap_or_else(|e| e.into_inner());
                spend(&c, &periods).map_err(|e| e.to_string())
            })
            .await
            .map_err(|e| e.to_string())?
        })
    }

    fn report(&self, q: Query) -> Fut<Result<Report, String>> {
        let path = self.path.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || report(&path, q).map_err(|e| e.to_string()))
                .await
                .map_err(|e| e.to_string())?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u64) -> UsageRecord {
        UsageRecord {
            request_id: axum::http::HeaderValue::from_str(&format!("req-{i:016x}")).unwrap(),
            ts: std::time::SystemTime::now(),
            key: Some("team-a".into()),
            model: Some("llama-3-8b".into()),
            deployment: Some("local(llama-3-8b@q8)".into()),
            priority: Some("normal"),
            endpoint: "/v1/chat/completions",
            stream: i % 2 == 0,
            status: 200,
            reason: "ok",
            attempts: 1,
            tokens_in: 20 + i % 7,
            tokens_out: 100 + i % 13,
            tokens_estimated: false,
            cost_input: 0.00004,
            cost_output: 0.001,
            cost: 0.00104,
            ttft_ms: Some(12.5),
            total_ms: 480.25,
        }
    }

    fn temp_db(tag: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("mofa-usage-unit-{tag}-{}.db", std::process::id()))
    }

    fn remove(db: &std::path::Path) {
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", db.display()));
        }
    }

    #[test]
    fn migrations_run_on_an_empty_file_and_again_on_a_migrated_one() {
        let db = temp_db("migrate");
        remove(&db);
        let path = db.to_str().unwrap();
        let mut c = open(path).unwrap();
        let batch = [record(1), record(2)];
        insert(&mut c, &batch, &crate::usage::deltas(&batch)).unwrap();
        drop(c);
        // Opened again (the next start): nothing to migrate, the rows are there.
        let c = open(path).unwrap();
        let n: i64 = c
            .query_row("SELECT count(*) FROM usage_records", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
        let version: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, MIGRATIONS.len() as i64);
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        drop(c);
        remove(&db);
    }

    #[test]
    fn a_database_of_the_previous_version_gets_its_spend_table_from_its_records() {
        let db = temp_db("upgrade");
        remove(&db);
        let path = db.to_str().unwrap();
        // Version 1: records only.
        let mut c = open_at(path, 1).unwrap();
        // No spend rows: version 1 has no spend table.
        insert(&mut c, &[record(1), record(2), record(3)], &[]).unwrap();
        drop(c);
        // The next version's start: the spend table is made from the three records.
        let mut c = open(path).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let periods: Vec<_> = Period::ALL.iter().map(|p| (*p, p.window(now).0)).collect();
        let tokens: u64 = (1..=3)
            .map(|i| record(i).tokens_in + record(i).tokens_out)
            .sum();
        let before = spend(&c, &periods).unwrap();
        assert_eq!(before.len(), 3, "{before:?}");
        for t in &before {
            assert_eq!(t.key, "team-a");
            assert_eq!(t.tokens, tokens);
            assert!((t.cost - 3.0 * 0.00104).abs() < 1e-12);
        }
        // New records add to it.
        let batch = [record(4)];
        let totals = insert(&mut c, &batch, &crate::usage::deltas(&batch)).unwrap();
        assert_eq!(totals.len(), 3);
        assert!(totals
            .iter()
            .all(|t| t.tokens == tokens + record(4).tokens_in + record(4).tokens_out));
        drop(c);
        remove(&db);
    }

    #[test]
    #[ignore = "benchmark: bench/usage.sh runs it in release mode"]
    fn insert_cost_per_record() {
        let db = temp_db("bench");
        remove(&db);
        let mut c = open(db.to_str().unwrap()).unwrap();
        let batch: Vec<UsageRecord> = (0..2000).map(record).collect();
        insert(&mut c, &batch, &[]).unwrap();
        let mut rounds = Vec::new();
        for _ in 0..10 {
            let start = crate::benchclock::thread_cpu_ns();
            insert(&mut c, &batch, &[]).unwrap();
            rounds.push((crate::benchclock::thread_cpu_ns() - start) as f64 / batch.len() as f64);
        }
        rounds.sort_by(f64::total_cmp);
        println!(
            "SQLite insert, thread CPU ns per record (batches of 2000, the ts index, WAL): median {:.0}, min {:.0}, max {:.0}",
            rounds[rounds.len() / 2],
            rounds[0],
            rounds[rounds.len() - 1]
        );
        drop(c);
        remove(&db);
    }
}
