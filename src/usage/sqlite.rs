//! The SQLite store: the embedded default (the SQLite bundled with `sqlx`, a file, WAL mode:
//! the writer does not block readers such as `mofa-gateway usage`). Its schema is the
//! versioned migrations of `migrations/sqlite`, run at open.

use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, SqlitePool};

use super::{Inserting, Store, UsageRecord};

/// Rows per `INSERT` (19 columns each, within SQLite's 32 766 bound variables).
const ROWS_PER_INSERT: usize = 500;

pub(super) struct Sqlite {
    pool: SqlitePool,
}

impl Sqlite {
    /// Opens (creating it if needed) the database at `path` and brings its schema up to date.
    pub(super) async fn open(path: &str) -> Result<Sqlite, String> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .connect_with(opts)
            .await
            .map_err(|e| format!("usage.path: cannot open the SQLite database {path}: {e}"))?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&pool)
            .await
            .map_err(|e| format!("usage.path: cannot migrate the SQLite database {path}: {e}"))?;
        Ok(Sqlite { pool })
    }
}

impl Store for Sqlite {
    fn insert<'a>(&'a self, batch: &'a [UsageRecord]) -> Inserting<'a> {
        Box::pin(async move {
            let mut tx = self.pool.begin().await.map_err(|e| e.to_string())?;
            for rows in batch.chunks(ROWS_PER_INSERT) {
                let mut q = QueryBuilder::<sqlx::Sqlite>::new(
                    "INSERT INTO usage_records (request_id, ts, key, model, deployment, \
                     priority, endpoint, stream, status, reason, attempts, tokens_in, \
                     tokens_out, tokens_estimated, cost_input, cost_output, cost, ttft_ms, \
                     total_ms) ",
                );
                q.push_values(rows, |mut b, r| {
                    b.push_bind(&r.request_id)
                        .push_bind(&r.ts)
                        .push_bind(&r.key)
                        .push_bind(&r.model)
                        .push_bind(&r.deployment)
                        .push_bind(r.priority)
                        .push_bind(r.endpoint)
                        .push_bind(r.stream)
                        .push_bind(i64::from(r.status))
                        .push_bind(r.reason)
                        .push_bind(i64::from(r.attempts))
                        .push_bind(i64::try_from(r.tokens_in).unwrap_or(i64::MAX))
                        .push_bind(i64::try_from(r.tokens_out).unwrap_or(i64::MAX))
                        .push_bind(r.tokens_estimated)
                        .push_bind(r.cost_input)
                        .push_bind(r.cost_output)
                        .push_bind(r.cost)
                        .push_bind(r.ttft_ms)
                        .push_bind(r.total_ms);
                });
                q.build()
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            tx.commit().await.map_err(|e| e.to_string())
        })
    }
}
