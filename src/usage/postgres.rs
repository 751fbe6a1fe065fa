//! The PostgreSQL store, for replicas: one server that several gateways write to and read
//! their budgets from. Its schema is the versioned migrations of `migrations/postgres`
//! (`refinery`, which records what has run in `refinery_schema_history`), applied at open. A
//! batch is one transaction: the records by binary `COPY`, then one multi-row upsert of the
//! spend table. The connection is remade when it breaks (the server restarted), so writing
//! resumes by itself; the URL's password never appears in an error.

use std::collections::HashMap;
use std::time::Duration;

use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls};

use super::report::{self, Bind, Query, Report, Row};
use super::{Fut, Inserting, Store, UsageRecord};
use crate::budget::{Period, SpendDelta, SpendTotal};

refinery::embed_migrations!("migrations/postgres");

const COPY: &str = "COPY usage_records (request_id, ts, key, model, deployment, priority, \
    endpoint, stream, status, reason, attempts, tokens_in, tokens_out, tokens_estimated, \
    cost_input, cost_output, cost, ttft_ms, total_ms) FROM STDIN (FORMAT binary)";

const COLUMNS: [Type; 19] = [
    Type::TEXT,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::BOOL,
    Type::INT4,
    Type::TEXT,
    Type::INT4,
    Type::INT8,
    Type::INT8,
    Type::BOOL,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
    Type::FLOAT8,
];

const ADD_SPEND: &str = "INSERT INTO usage_spend (key, period, label, cost, tokens) \
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::int8[]) \
    ON CONFLICT (key, period, label) DO UPDATE SET cost = usage_spend.cost + EXCLUDED.cost, \
    tokens = usage_spend.tokens + EXCLUDED.tokens RETURNING key, period, label, cost, tokens";

/// Longest one batch or read may take before the connection is dropped and remade.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub(super) struct Postgres {
    config: tokio_postgres::Config,
    /// Used by the writer and the budget re-read, never on the request path.
    client: std::sync::Arc<tokio::sync::Mutex<Option<Client>>>,
}

impl Postgres {
    /// Connects to `url` and brings its schema up to date; fails when the server cannot be
    /// reached (the start fails, naming `usage.url`).
    pub(super) async fn open(url: &str) -> Result<Postgres, String> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| format!("usage.url: not a PostgreSQL URL ({e})"))?;
        config.connect_timeout(Duration::from_secs(5));
        let mut client = connect(&config)
            .await
            .map_err(|e| format!("usage.url: cannot connect to PostgreSQL: {e}"))?;
        migrations::runner()
            .run_async(&mut client)
            .await
            .map_err(|e| format!("usage.url: cannot migrate the usage tables: {e}"))?;
        Ok(Postgres {
            config,
            client: std::sync::Arc::new(tokio::sync::Mutex::new(Some(client))),
        })
    }

    /// The connection, made again if it broke.
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>, String> {
        let mut slot = self.client.lock().await;
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(connect(&self.config).await.map_err(|e| e.to_string())?);
        }
        Ok(slot)
    }
}

/// `f`'s result within [`TIMEOUT`]. On a failure the caller drops the connection so that the
/// next call makes a new one.
async fn bounded<T>(
    f: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, String> {
    match tokio::time::timeout(TIMEOUT, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer in {} s", TIMEOUT.as_secs())),
    }
}

async fn connect(config: &tokio_postgres::Config) -> Result<Client, tokio_postgres::Error> {
    let (client, conn) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("usage ledger: PostgreSQL connection closed: {e}");
        }
    });
    Ok(client)
}

/// Inserts `batch` and adds `spend` in one transaction; the spend table's totals after it,
/// in `spend`'s order.
async fn insert(
    client: &mut Client,
    batch: &[UsageRecord],
    spend: &[SpendDelta],
) -> Result<Vec<SpendTotal>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let sink = tx.copy_in(COPY).await?;
    let mut w = std::pin::pin!(BinaryCopyInWriter::new(sink, &COLUMNS));
    for r in batch {
        let status = i32::from(r.status);
        let attempts = i32::try_from(r.attempts).unwrap_or(i32::MAX);
        let tokens_in = i64::try_from(r.tokens_in).unwrap_or(i64::MAX);
        let tokens_out = i64::try_from(r.tokens_out).unwrap_or(i64::MAX);
        let row: [&(dyn ToSql + Sync); 19] = [
            &r.request_id.to_str().unwrap_or_default(),
            &r.ts,
            &r.key.as_deref(),
            &r.model.as_deref(),
            &r.deployment.as_deref(),
            &r.priority,
            &r.endpoint,
            &r.stream,
            &status,
            &r.reason,
            &attempts,
            &tokens_in,
            &tokens_out,
            &r.tokens_estimated,
            &r.cost_input,
            &r.cost_output,
            &r.cost,
            &r.ttft_ms,
            &r.total_ms,
        ];
        w.as_mut().write(&row).await?;
    }
    w.finish().await?;
    let mut totals = Vec::with_capacity(spend.len());
    if !spend.is_empty() {
        let keys: Vec<&str> = spend.iter().map(|d| &*d.key).collect();
        let periods: Vec<&str> = spend.iter().map(|d| d.period.as_str()).collect();
        let labels: Vec<&str> = spend.iter().map(|d| d.label.as_str()).collect();
        let costs: Vec<f64> = spend.iter().map(|d| d.cost).collect();
        let tokens: Vec<i64> = spend
            .iter()
            .map(|d| i64::try_from(d.tokens).unwrap_or(i64::MAX))
            .collect();
        let rows = tx
            .query(ADD_SPEND, &[&keys, &periods, &labels, &costs, &tokens])
            .await?;
        let mut by: HashMap<(String, String, String), (f64, i64)> = HashMap::new();
        for row in rows {
            by.insert(
                (row.get(0), row.get(1), row.get(2)),
                (row.get(3), row.get(4)),
            );
        }
        for d in spend {
            let k = (
                d.key.to_string(),
                d.period.as_str().to_owned(),
                d.label.clone(),
            );
            let (cost, tokens) = by.get(&k).copied().unwrap_or((d.cost, 0));
            totals.push(SpendTotal {
                key: k.0,
                period: d.period,
                label: k.2,
                cost,
                tokens: u64::try_from(tokens).unwrap_or(0),
            });
        }
    }
    tx.commit().await?;
    Ok(totals)
}

async fn spend(
    client: &mut Client,
    periods: &[(Period, String)],
) -> Result<Vec<SpendTotal>, tokio_postgres::Error> {
    let mut out = Vec::new();
    for (period, label) in periods {
        let rows = client
            .query(
                "SELECT key, cost, tokens FROM usage_spend WHERE period = $1 AND label = $2",
                &[&period.as_str(), label],
            )
            .await?;
        for row in rows {
            out.push(SpendTotal {
                key: row.get(0),
                period: *period,
                label: label.clone(),
                cost: row.get(1),
                tokens: u64::try_from(row.get::<_, i64>(2)).unwrap_or(0),
            });
        }
    }
    Ok(out)
}

/// Runs `q` on a connection of its own (the writer's goes on).
async fn report(client: &Client, q: Query) -> Result<Report, tokio_postgres::Error> {
    let (text, binds) = report::sql(&q, "to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD')", |n| {
        format!("${n}")
    });
    let time = |us: Option<u64>| std::time::UNIX_EPOCH + Duration::from_micros(us.unwrap_or(0));
    let (from, to) = (time(q.from_us), time(q.to_us));
    let (key, model) = (
        q.key.clone().unwrap_or_default(),
        q.model.clone().unwrap_or_default(),
    );
    let params: Vec<&(dyn ToSql + Sync)> = binds
        .iter()
        .map(|b| -> &(dyn ToSql + Sync) {
            match b {
                Bind::From => &from,
                Bind::To => &to,
                Bind::Key => &key,
                Bind::Model => &model,
            }
        })
        .collect();
    let groups = q.group_by.len();
    let count = |r: &tokio_postgres::Row, i| {
        r.try_get::<_, i64>(i)
            .map(|v| u64::try_from(v).unwrap_or(0))
    };
    let rows = client
        .query(&text, &params)
        .await?
        .iter()
        .map(|r| {
            Ok(Row {
                groups: (0..groups)
                    .map(|i| r.try_get::<_, Option<String>>(i))
                    .collect::<Result<_, _>>()?,
                requests: count(r, groups)?,
                failed: count(r, groups + 1)?,
                tokens_in: count(r, groups + 2)?,
                tokens_out: count(r, groups + 3)?,
                cost: r.try_get(groups + 4)?,
            })
        })
        .collect::<Result<Vec<Row>, tokio_postgres::Error>>()?;
    Ok(Report::new(q, rows))
}

impl Store for Postgres {
    fn insert(&self, batch: Vec<UsageRecord>, spend: Vec<SpendDelta>) -> Inserting {
        let me = self.clone();
        Box::pin(async move {
            let done = match me.client().await {
                Ok(mut slot) => match slot.take() {
                    Some(mut c) => {
                        let r = bounded(insert(&mut c, &batch, &spend)).await;
                        if r.is_ok() {
                            *slot = Some(c);
                        }
                        r
                    }
                    None => Err("no connection".into()),
                },
                Err(e) => Err(e),
            };
            done.map_err(|e| (e, batch))
        })
    }

    fn spend(&self, periods: Vec<(Period, String)>) -> Fut<Result<Vec<SpendTotal>, String>> {
        let me = self.clone();
        Box::pin(async move {
            let mut slot = me.client().await?;
            let Some(mut c) = slot.take() else {
                return Err("no connection".into());
            };
            let r = bounded(spend(&mut c, &periods)).await;
            if r.is_ok() {
                *slot = Some(c);
            }
            r
        })
    }

    fn report(&self, q: Query) -> Fut<Result<Report, String>> {
        let config = self.config.clone();
        Box::pin(async move {
            let client = bounded(connect(&config)).await?;
            bounded(report(&client, q)).await
        })
    }
}
