//! The usage ledger with the real binary and a real SQLite file: one row per finished request,
//! with the tokens the client was told (`usage`) and their cost; a try that failed before the
//! one that served is not billed; SIGTERM writes every queued record before exit.

mod common;

use common::*;
use rusqlite::types::Value as Sql;
use serde_json::{json, Value};

/// One row of the ledger, by column name.
struct Row(std::collections::HashMap<String, Sql>);

impl Row {
    fn int(&self, col: &str) -> i64 {
        match &self.0[col] {
            Sql::Integer(i) => *i,
            v => panic!("{col} is {v:?}"),
        }
    }
    fn real(&self, col: &str) -> f64 {
        match &self.0[col] {
            Sql::Real(f) => *f,
            Sql::Integer(i) => *i as f64,
            v => panic!("{col} is {v:?}"),
        }
    }
    fn text(&self, col: &str) -> Option<String> {
        match &self.0[col] {
            Sql::Text(t) => Some(t.clone()),
            Sql::Null => None,
            v => panic!("{col} is {v:?}"),
        }
    }
    fn str(&self, col: &str) -> String {
        self.text(col).unwrap_or_else(|| panic!("{col} is null"))
    }
    fn flag(&self, col: &str) -> bool {
        self.int(col) != 0
    }
}

/// Every row of the ledger, oldest first (read by another connection, as a report would).
fn rows(db: &std::path::Path) -> Vec<Row> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let mut st = conn
        .prepare("SELECT * FROM usage_records ORDER BY id")
        .unwrap();
    let names: Vec<String> = st.column_names().iter().map(|n| n.to_string()).collect();
    st.query_map([], |r| {
        let mut m = std::collections::HashMap::new();
        for (i, n) in names.iter().enumerate() {
            m.insert(n.clone(), r.get::<_, Sql>(i)?);
        }
        Ok(Row(m))
    })
    .unwrap()
    .map(Result::unwrap)
    .collect()
}

/// The `usage` a client was told: from a whole reply, or a stream's last usage chunk.
fn told(body: &Value) -> (u64, u64) {
    let u = &body["usage"];
    (
        u["prompt_tokens"].as_u64().unwrap(),
        u["completion_tokens"].as_u64().unwrap(),
    )
}

#[tokio::test]
async fn every_request_is_recorded_with_the_tokens_the_client_was_told_and_sigterm_loses_none() {
    let dir = TempDir::new("usage");
    let db = dir.0.join("usage.db");
    let upstream = sim(sim_opts("m")).await;
    let dead = dead_url().await;
    let cfg = GatewayBuilder::new()
        .usage_sqlite(&db)
        .key(Key::new("team-a", "sk-a"))
        .model("m", |m| {
            m.deployment(
                Deployment::local(&upstream)
                    .input_price_per_1m(2.0)
                    .output_price_per_1m(10.0),
            )
        })
        // Under `cost`, the free local deployment is tried first; it is down, so the cloud one
        // serves: only the cloud one's prices apply.
        .model("fallback", |m| {
            m.policy("cost")
                .deployment(Deployment::local(&dead).upstream_model("m"))
                .deployment(
                    Deployment::cloud("sim", &upstream)
                        .upstream_model("m")
                        .price_per_1k_tokens(0.001),
                )
        });
    let file = dir.write("gateway.toml", &cfg.toml());
    let (mut bin, gw) = run_gateway_file(&file, &[]).await;
    let auth = [("authorization", "Bearer sk-a")];
    let mut expected = Vec::new();
    for i in 0..6 {
        let mut body = chat_body("m", i % 2 == 1);
        body["max_tokens"] = json!(3 + i);
        if i % 2 == 1 {
            body["stream_options"] = json!({"include_usage": true});
        }
        let r = chat_with(gw, &body, &auth).await;
        assert_eq!(r.status(), 200);
        let usage = if i % 2 == 1 {
            let sse = read_sse(r).await;
            assert!(sse.done(), "{}", sse.text);
            let last = sse
                .data
                .iter()
                .rev()
                .find(|d| d.contains("\"usage\"") && d.contains("prompt_tokens"))
                .unwrap();
            told(&serde_json::from_str(last).unwrap())
        } else {
            told(&r.json::<Value>().await.unwrap())
        };
        expected.push(("m", i % 2 == 1, usage));
    }
    let r = chat_with(gw, &chat_body("fallback", false), &auth).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mofa-attempts"], "2");
    expected.push(("fallback", false, told(&r.json::<Value>().await.unwrap())));
    // A refused request is recorded too (no deployment: no cost).
    let r = chat_with(
        gw,
        &chat_body("m", false),
        &[("authorization", "Bearer sk-nope")],
    )
    .await;
    assert_eq!(r.status(), 401);

    // The metric agrees with the tokens each client was told, priced.
    let want: f64 = expected
        .iter()
        .filter(|(m, ..)| *m == "m")
        .map(|(_, _, (tin, tout))| *tin as f64 * 2.0 / 1e6 + *tout as f64 * 10.0 / 1e6)
        .sum();
    let metrics = get(gw, "/metrics").await.text().await.unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with(r#"mofa_gateway_cost_total{model="m",key="team-a"}"#))
        .unwrap_or_else(|| panic!("no cost_total for m: {metrics}"));
    let got: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((got - want).abs() < 1e-12, "{line}, want {want}");

    // SIGTERM right away: the records still queued are written before the process exits.
    bin.signal("-TERM");
    assert!(bin.wait().await.success());
    let rows = rows(&db);
    assert_eq!(rows.len(), expected.len() + 1, "one row per request");
    for (row, (model, stream, (tin, tout))) in rows.iter().zip(&expected) {
        assert_eq!(row.str("model"), *model);
        assert_eq!(row.flag("stream"), *stream);
        assert_eq!(row.int("status"), 200);
        assert_eq!(row.str("key"), "team-a");
        assert_eq!(row.str("endpoint"), "/v1/chat/completions");
        assert_eq!(row.int("tokens_in") as u64, *tin);
        assert_eq!(row.int("tokens_out") as u64, *tout);
        assert!(!row.flag("tokens_estimated"));
        let (pin, pout) = if *model == "m" {
            (2.0, 10.0)
        } else {
            (1.0, 1.0)
        };
        let want = *tin as f64 * pin / 1e6 + *tout as f64 * pout / 1e6;
        let cost = row.real("cost");
        assert!(
            (cost - want).abs() < 1e-12,
            "{model}: cost {cost}, want {want}"
        );
        assert!(row.str("ts").ends_with('Z'));
        assert!(row.real("total_ms") > 0.0);
    }
    let fallback = &rows[expected.len() - 1];
    assert_eq!(fallback.int("attempts"), 2);
    assert_eq!(fallback.str("deployment"), "cloud(sim)");
    let refused = &rows[expected.len()];
    assert_eq!(refused.int("status"), 401);
    assert_eq!(refused.str("reason"), "invalid_request");
    assert_eq!(refused.real("cost"), 0.0);
    assert!(refused.text("deployment").is_none());
}

#[tokio::test]
async fn a_cut_stream_is_recorded_with_what_it_delivered_and_a_locked_database_delays_but_loses_nothing(
) {
    let dir = TempDir::new("usage");
    let db = dir.0.join("usage.db");
    // Paced, so that each chunk leaves the simulator before it drops the connection.
    let cut = sim(mofa_gateway::sim::SimOptions {
        die_after_tokens: Some(3),
        tokens_per_sec: 100.0,
        ..sim_opts("cut")
    })
    .await;
    let ok = sim(sim_opts("m")).await;
    let cfg = GatewayBuilder::new()
        .usage_sqlite(&db)
        .local_model("cut", &cut)
        .local_model("m", &ok);
    let file = dir.write("gateway.toml", &cfg.toml());
    let (mut bin, gw) = run_gateway_file(&file, &[]).await;

    // A stream its backend cuts after 3 tokens: an SSE error event, no [DONE]; recorded as a
    // 200 `stream_broken` with the tokens it delivered (estimated: no usage came).
    let mut body = chat_body("cut", true);
    body["max_tokens"] = json!(20);
    let sse = read_sse(chat(gw, &body).await).await;
    assert!(!sse.done() && sse.named_error, "{}", sse.text);
    eventually("the cut stream's record", WAIT, || {
        let db = db.clone();
        async move { rows(&db).len() == 1 }
    })
    .await;
    let row = &rows(&db)[0];
    assert_eq!(row.str("reason"), "stream_broken");
    assert_eq!(row.int("status"), 200);
    assert!(row.flag("tokens_estimated"));
    let delivered = row.int("tokens_out");
    assert!((1..=3).contains(&delivered), "delivered {delivered}");

    // Another connection holds the database's write lock: the ledger cannot write, requests
    // go on unharmed; once it lets go, every record is written.
    let locker = rusqlite::Connection::open(&db).unwrap();
    locker.execute_batch("BEGIN EXCLUSIVE").unwrap();
    for _ in 0..20 {
        assert_eq!(chat(gw, &chat_body("m", false)).await.status(), 200);
    }
    // Longer than the writer's flush interval: it has tried, and waits on the lock.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let held: i64 = locker
        .query_row("SELECT count(*) FROM usage_records", [], |r| r.get(0))
        .unwrap();
    assert_eq!(held, 1, "nothing written while the lock is held");
    locker.execute_batch("ROLLBACK").unwrap();
    drop(locker);
    eventually("the 20 records written after the lock", WAIT, || {
        let db = db.clone();
        async move { rows(&db).len() == 21 }
    })
    .await;
    bin.signal("-TERM");
    assert!(bin.wait().await.success());
    assert_eq!(rows(&db).len(), 21);
}
