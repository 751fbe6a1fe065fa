//! The SQLite store: the embedded default (the SQLite bundled with `rusqlite`, a file, WAL
//! mode: the writer does not block readers such as `sqlite3` or a report). Its schema is the
//! versioned migrations of `migrations/sqlite` (`rusqlite_migration`: SQLite's
//! `user_version` says which have run), applied at open. The connection lives on the
//! blocking pool's threads (`spawn_blocking`), never on the runtime.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{params, Connection};
use rusqlite_migration::{Migrations, M};

use super::{Inserting, Store, UsageRecord};

/// The schema's versions, in order; a new one is appended, never edited.
const MIGRATIONS: &[&str] = &[include_str!(
    "../../migrations/sqlite/0001_usage_records.sql"
)];

const INSERT: &str = "INSERT INTO usage_records (request_id, ts, key, model, deployment, \
    priority, endpoint, stream, status, reason, attempts, tokens_in, tokens_out, \
    tokens_estimated, cost_input, cost_output, cost, ttft_ms, total_ms) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19)";

pub(super) struct Sqlite {
    conn: Arc<Mutex<Connection>>,
}

impl Sqlite {
    /// Opens (creating it if needed) the database at `path` and brings its schema up to date.
    pub(super) async fn open(path: &str) -> Result<Sqlite, String> {
        let path = path.to_owned();
        let conn = tokio::task::spawn_blocking(move || open(&path))
            .await
            .map_err(|e| e.to_string())??;
        Ok(Sqlite {
            conn: Arc::new(Mutex::new(conn)),
        })
    }
}

fn open(path: &str) -> Result<Connection, String> {
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
    Migrations::new(MIGRATIONS.iter().map(|sql| M::up(sql)).collect())
        .to_latest(&mut conn)
        .map_err(|e| fail("migrate", &e))?;
    Ok(conn)
}

/// Inserts `batch` in one transaction, one cached prepared statement a row.
fn insert(conn: &mut Connection, batch: &[UsageRecord]) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
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
    }
    tx.commit()
}

impl Store for Sqlite {
    fn insert(&self, batch: Vec<UsageRecord>) -> Inserting {
        let conn = self.conn.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut c = conn.lock().unwrap_or_else(|e| e.into_inner());
                match insert(&mut c, &batch) {
                    Ok(()) => Ok(()),
                    Err(e) => Err((e.to_string(), batch)),
                }
            })
            .await
            .unwrap_or_else(|e| Err((e.to_string(), Vec::new())))
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
        insert(&mut c, &[record(1), record(2)]).unwrap();
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
    #[ignore = "benchmark: bench/usage.sh runs it in release mode"]
    fn insert_cost_per_record() {
        let db = temp_db("bench");
        remove(&db);
        let mut c = open(db.to_str().unwrap()).unwrap();
        let batch: Vec<UsageRecord> = (0..2000).map(record).collect();
        insert(&mut c, &batch).unwrap();
        let mut rounds = Vec::new();
        for _ in 0..10 {
            let start = crate::benchclock::thread_cpu_ns();
            insert(&mut c, &batch).unwrap();
            rounds.push((crate::benchclock::thread_cpu_ns() - start) as f64 / batch.len() as f64);
        }
        rounds.sort_by(f64::total_cmp);
        println!(
            "SQLite insert, thread CPU ns per record (batches of 2000, 3 indexes, WAL): median {:.0}, min {:.0}, max {:.0}",
            rounds[rounds.len() / 2],
            rounds[0],
            rounds[rounds.len() - 1]
        );
        drop(c);
        remove(&db);
    }
}
