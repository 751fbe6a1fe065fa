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

// ---------------------------------------------------------------------------------------------
// Budgets.

/// The tokens of a whole reply (`usage`), input + output.
async fn tokens_of(r: reqwest::Response) -> u64 {
    let (tin, tout) = told(&r.json::<Value>().await.unwrap());
    tin + tout
}

/// A key's requests until the first refusal: the tokens the client was told, summed, and the
/// refusal.
async fn spend_until_refused(
    gw: std::net::SocketAddr,
    secret: &str,
    model: &str,
) -> (u64, u32, reqwest::Response) {
    let auth = format!("Bearer {secret}");
    let mut spent = 0;
    for n in 0..200 {
        let mut body = chat_body(model, false);
        body["max_tokens"] = json!(5);
        let r = chat_with(gw, &body, &[("authorization", &auth)]).await;
        if r.status() != 200 {
            return (spent, n, r);
        }
        spent += tokens_of(r).await;
    }
    panic!("never refused after 200 requests ({spent} tokens)");
}

#[tokio::test]
async fn a_key_over_its_budget_gets_insufficient_quota_until_the_period_resets_even_after_a_restart(
) {
    let dir = TempDir::new("budget");
    let db = dir.0.join("usage.db");
    let upstream = sim(sim_opts("m")).await;
    let cfg = GatewayBuilder::new()
        .usage_sqlite(&db)
        .key(Key::new("tokens", "sk-t").token_budget(100, "day"))
        .key(Key::new("money", "sk-m").budget(0.001, "month"))
        .key(Key::new("free", "sk-f"))
        .model("m", |m| {
            m.deployment(
                Deployment::local(&upstream)
                    .input_price_per_1m(10.0)
                    .output_price_per_1m(30.0),
            )
        });
    let file = dir.write("gateway.toml", &cfg.toml());
    let (mut bin, gw) = run_gateway_file(&file, &[]).await;

    // A reply under budget says what is left.
    let mut body = chat_body("m", false);
    body["max_tokens"] = json!(5);
    let r = chat_with(gw, &body, &[("authorization", "Bearer sk-t")]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit-budget-tokens"], "100");
    assert_eq!(r.headers()["x-ratelimit-remaining-budget-tokens"], "100");
    let reset: u64 = r.headers()["x-ratelimit-reset-budget-tokens"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=86_400).contains(&reset), "{reset}");
    assert!(r.headers().get("x-ratelimit-limit-budget").is_none());
    let first = tokens_of(r).await;

    // Sequential requests on one gateway: it stops at the first request after the budget is
    // reached, not one later.
    let (spent, _, refused) = spend_until_refused(gw, "sk-t", "m").await;
    let spent = spent + first;
    assert!(spent >= 100 && spent - first < 100 + first, "spent {spent}");
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["x-should-retry"], "false");
    assert_eq!(refused.headers()["x-mofa-backend"], "gateway");
    assert_eq!(
        refused.headers()["x-ratelimit-remaining-budget-tokens"],
        "0"
    );
    let retry: u64 = refused.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=86_400).contains(&retry), "{retry}");
    let e = envelope(refused).await;
    assert_eq!(e["code"], "insufficient_quota");
    assert_eq!(e["type"], "insufficient_quota");
    let msg = e["message"].as_str().unwrap();
    assert!(
        msg.contains("`tokens`") && msg.contains("token budget of 100 tokens per day"),
        "{msg}"
    );
    assert!(
        msg.contains("resets at") && msg.contains("T00:00:00Z"),
        "{msg}"
    );

    // A currency budget: priced tokens.
    let (_, served, refused) = spend_until_refused(gw, "sk-m", "m").await;
    assert!(served >= 1);
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["x-ratelimit-limit-budget"], "0.001");
    let msg = envelope(refused).await["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(msg.contains("budget of 0.00 per month"), "{msg}");
    assert!(msg.contains("-01T00:00:00Z"), "{msg}");

    // A key without a budget is not limited by the others'.
    assert_eq!(
        chat_with(gw, &body, &[("authorization", "Bearer sk-f")])
            .await
            .status(),
        200
    );

    // A restart reads what was spent from the ledger: still refused.
    bin.signal("-TERM");
    assert!(bin.wait().await.success());
    let (_bin, gw) = run_gateway_file(&file, &[]).await;
    let r = chat_with(gw, &body, &[("authorization", "Bearer sk-t")]).await;
    assert_eq!(r.status(), 429);
    assert_eq!(envelope(r).await["code"], "insufficient_quota");
    assert_eq!(
        chat_with(gw, &body, &[("authorization", "Bearer sk-m")])
            .await
            .status(),
        429
    );
    assert_eq!(
        chat_with(gw, &body, &[("authorization", "Bearer sk-f")])
            .await
            .status(),
        200
    );
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL.

/// The ledger's rows in Postgres: (count, tokens in + out) of those with `status`.
async fn pg_totals(pg: &PgServer, status: i32) -> (i64, i64) {
    let c = pg.client().await;
    let row = c
        .query_one(
            "SELECT count(*), coalesce(sum(tokens_in + tokens_out), 0)::bigint FROM usage_records WHERE status = $1",
            &[&status],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Two clients on each replica spend key `sk-team` on model `m`, each sequentially until it is
/// refused (429 `insufficient_quota`); the tokens they were told in all, and the most a request
/// spent.
async fn spend_on_two_replicas(
    gw_a: std::net::SocketAddr,
    gw_b: std::net::SocketAddr,
) -> (u64, u64) {
    let clients: Vec<_> = [gw_a, gw_a, gw_b, gw_b]
        .into_iter()
        .map(|gw| tokio::spawn(async move { spend_until_refused(gw, "sk-team", "m").await }))
        .collect();
    let mut told = 0;
    let mut most = 0;
    for c in clients {
        let (spent, n, refused) = c.await.unwrap();
        assert_eq!(refused.status(), 429);
        assert_eq!(envelope(refused).await["code"], "insufficient_quota");
        told += spent;
        most = most.max(spent / u64::from(n.max(1)));
    }
    (told, most)
}

#[tokio::test]
async fn two_replicas_on_one_postgres_stop_a_budget_at_the_same_total() {
    let pg = PgServer::start().await;
    // Paced replies (5 tokens at 25/s, about 0.2 s each), so that a replica learns what the
    // other spent (written every 100 ms, re-read every 100 ms) within about one request.
    let upstream = sim(mofa_gateway::sim::SimOptions {
        tokens_per_sec: 25.0,
        ..sim_opts("m")
    })
    .await;
    let budget = 300;
    let cfg = GatewayBuilder::new()
        .usage_postgres(&pg.url())
        .key(Key::new("team", "sk-team").token_budget(budget, "month"))
        .admin_key("sk-admin")
        .local_model("m", &upstream);
    let dir = TempDir::new("pg-replicas");
    let file = dir.write("gateway.toml", &cfg.toml());
    let (_a, gw_a) = run_gateway_file(&file, &[]).await;
    let (_b, gw_b) = run_gateway_file(&file, &[]).await;

    // Two clients on each replica, each sequential, until each is refused.
    let (told, most) = spend_on_two_replicas(gw_a, gw_b).await;
    // Every record is in, and the ledger agrees with the clients.
    eventually("the replicas' records", WAIT, || async {
        pg_totals(&pg, 200).await.1 as u64 == told
    })
    .await;
    // Reached, and passed by at most the requests in flight when it was: four clients, one
    // each, and one more each for what the other replica had not written yet.
    assert!(told >= budget, "stopped early: {told} < {budget}");
    assert!(
        told <= budget + 8 * most,
        "{told} tokens against a budget of {budget} ({most} a request)"
    );
    // Both replicas now refuse, and say nothing is left.
    for gw in [gw_a, gw_b] {
        let r = chat_with(
            gw,
            &chat_body("m", false),
            &[("authorization", "Bearer sk-team")],
        )
        .await;
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["x-ratelimit-remaining-budget-tokens"], "0");
    }
    // Either replica's report reads the shared ledger: every token the clients were told,
    // and the refusals as failed requests.
    // Four clients and two checks were refused: six records not `ok`, once written.
    let (c, failed) = eventually_some("the refusals' records", WAIT, || async {
        let c = pg.client().await;
        let row = c
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE reason <> 'ok') FROM usage_records",
                &[],
            )
            .await
            .unwrap();
        let (all, failed) = (row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64);
        (failed == 6).then_some((all, failed))
    })
    .await;
    for gw in [gw_a, gw_b] {
        let (status, _, body) = usage_report(gw, "?group_by=key,day&from=1d").await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        let rows = v["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 1, "{v}");
        assert_eq!(rows[0]["key"], "team");
        assert_eq!(rows[0]["requests"], c);
        assert_eq!(rows[0]["failed"], failed);
        let tokens =
            rows[0]["tokens_in"].as_u64().unwrap() + rows[0]["tokens_out"].as_u64().unwrap();
        assert_eq!(tokens, told);
    }
}

#[tokio::test]
async fn postgres_down_for_10_s_under_load_fails_no_request_and_loses_no_record_nor_at_sigterm() {
    let pg = PgServer::start().await;
    let upstream = sim(sim_opts("m")).await;
    let cfg = GatewayBuilder::new()
        .usage_postgres(&pg.url())
        .local_model("m", &upstream);
    let dir = TempDir::new("pg-down");
    let file = dir.write("gateway.toml", &cfg.toml());
    let (mut bin, gw) = run_gateway_file(&file, &[]).await;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = |stop: std::sync::Arc<std::sync::atomic::AtomicBool>| {
        tokio::spawn(async move {
            let (mut ok, mut other) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match reqwest::Client::new()
                    .post(format!("http://{gw}/v1/chat/completions"))
                    .json(&chat_body("m", false))
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => ok += 1,
                    Ok(r) => other.push(r.status().as_u16()),
                    Err(_) => break, // the gateway has exited
                }
            }
            (ok, other)
        })
    };
    let clients: Vec<_> = (0..4).map(|_| load(stop.clone())).collect();
    eventually("records written", WAIT, || async {
        pg_totals(&pg, 200).await.0 > 50
    })
    .await;
    pg.stop();
    tokio::time::sleep(std::time::Duration::from_secs(10)).await;
    pg.start_again().await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut served = 0;
    for c in clients {
        let (ok, other) = c.await.unwrap();
        assert!(
            other.is_empty(),
            "failed requests while Postgres was down: {other:?}"
        );
        served += ok;
    }
    eventually("the outage's records written after it", WAIT, || async {
        pg_totals(&pg, 200).await.0 as u64 == served
    })
    .await;
    let metrics = get(gw, "/metrics").await.text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "mofa_gateway_usage_dropped_total 0"),
        "{metrics}"
    );

    // SIGTERM under load: every request a client saw succeed is in the ledger after exit.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..4).map(|_| load(stop.clone())).collect();
    eventually("more records", WAIT, || async {
        pg_totals(&pg, 200).await.0 as u64 > served + 50
    })
    .await;
    bin.signal("-TERM");
    assert!(bin.wait().await.success());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in clients {
        let (ok, other) = c.await.unwrap();
        // Refused during the drain: 503 shutting_down, never a 200 that is not recorded.
        assert!(other.iter().all(|s| *s == 503), "{other:?}");
        served += ok;
    }
    assert_eq!(pg_totals(&pg, 200).await.0 as u64, served);
}

mod previous_version {
    refinery::embed_migrations!("migrations/postgres");
}

#[tokio::test]
async fn postgres_migrations_run_on_an_empty_database_and_on_one_of_the_previous_version() {
    let pg = PgServer::start().await;
    // The previous version's schema (V1: records only), with a record of last month's and
    // one of today's.
    let mut c = pg.client().await;
    previous_version::migrations::runner()
        .set_target(refinery::Target::Version(1))
        .run_async(&mut c)
        .await
        .unwrap();
    c.batch_execute(
        "INSERT INTO usage_records (request_id, ts, key, model, endpoint, stream, status, reason, \
         attempts, tokens_in, tokens_out, tokens_estimated, cost_input, cost_output, cost, total_ms) VALUES \
         ('old', now() - interval '40 days', 'team', 'm', '/v1/chat/completions', false, 200, 'ok', 1, 10, 20, false, 0, 0, 0.5, 1), \
         ('new', now(), 'team', 'm', '/v1/chat/completions', false, 200, 'ok', 1, 1, 2, false, 0, 0, 0.25, 1)",
    )
    .await
    .unwrap();
    let upstream = sim(sim_opts("m")).await;
    let cfg = GatewayBuilder::new()
        .usage_postgres(&pg.url())
        .key(Key::new("team", "sk-team").budget(0.75, "total"))
        .local_model("m", &upstream);
    let dir = TempDir::new("pg-migrate");
    let file = dir.write("gateway.toml", &cfg.toml());
    let (_bin, gw) = run_gateway_file(&file, &[]).await;
    // Migrated to V2: the spend table made from the records; the total budget is spent.
    let v: i32 = c
        .query_one("SELECT max(version) FROM refinery_schema_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 2);
    let total: f64 = c
        .query_one(
            "SELECT cost FROM usage_spend WHERE key = 'team' AND period = 'total'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(total, 0.75);
    let months: i64 = c
        .query_one(
            "SELECT count(*) FROM usage_spend WHERE key = 'team' AND period = 'month'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(months >= 1);
    let r = chat_with(
        gw,
        &chat_body("m", false),
        &[("authorization", "Bearer sk-team")],
    )
    .await;
    assert_eq!(r.status(), 429);
    let msg = envelope(r).await["message"].as_str().unwrap().to_string();
    assert!(
        msg.contains("in total") && msg.contains("does not reset"),
        "{msg}"
    );

    // An empty database: both versions run at start.
    let fresh = PgServer::start().await;
    let cfg = GatewayBuilder::new()
        .usage_postgres(&fresh.url())
        .local_model("m", &upstream);
    let file = dir.write("fresh.toml", &cfg.toml());
    let (_bin, gw) = run_gateway_file(&file, &[]).await;
    assert_eq!(chat(gw, &chat_body("m", false)).await.status(), 200);
    eventually("the record", WAIT, || async {
        pg_totals(&fresh, 200).await.0 == 1
    })
    .await;
}

// Reading the ledger back.

/// `GET /admin/usage` with the admin key; its status, content type and body.
async fn usage_report(gw: std::net::SocketAddr, query: &str) -> (u16, String, String) {
    let r = get_with(
        gw,
        &format!("/admin/usage{query}"),
        &[("authorization", "Bearer sk-admin")],
    )
    .await;
    let status = r.status().as_u16();
    let ct = r.headers()["content-type"].to_str().unwrap().to_string();
    (status, ct, r.text().await.unwrap())
}

/// The report's rows as (group values joined by `/`, requests, tokens in + out).
fn report_rows(report: &Value, groups: &[&str]) -> Vec<(String, u64, u64)> {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let name = groups
                .iter()
                .map(|g| r[*g].as_str().unwrap_or("-").to_string())
                .collect::<Vec<_>>()
                .join("/");
            let tokens = r["tokens_in"].as_u64().unwrap() + r["tokens_out"].as_u64().unwrap();
            (name, r["requests"].as_u64().unwrap(), tokens)
        })
        .collect()
}

#[tokio::test]
async fn the_ledger_reads_back_by_key_model_and_day_as_json_csv_and_from_the_cli() {
    let dir = TempDir::new("usage-report");
    let db = dir.0.join("usage.db");
    let upstream = sim(sim_opts("m")).await;
    let priced = |url: &str| {
        Deployment::local(url)
            .upstream_model("m")
            .input_price_per_1m(1.0)
            .output_price_per_1m(1.0)
    };
    let cfg = GatewayBuilder::new()
        .usage_sqlite(&db)
        .key(Key::new("team-a", "sk-a"))
        .key(Key::new("team-b", "sk-b"))
        .admin_key("sk-admin")
        .model("m1", |m| m.deployment(priced(&upstream)))
        .model("m2", |m| m.deployment(priced(&upstream)));
    let file = dir.write("gateway.toml", &cfg.toml());
    let (_bin, gw) = run_gateway_file(&file, &[]).await;

    // What each (key, model) was told, stream and not.
    let mut expected: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    for (key, model, n) in [("a", "m1", 3), ("a", "m2", 1), ("b", "m1", 2)] {
        for i in 0..n {
            let stream = i == 1;
            let mut body = chat_body(model, stream);
            body["max_tokens"] = json!(2 + i);
            if stream {
                body["stream_options"] = json!({"include_usage": true});
            }
            let r = chat_with(gw, &body, &[("authorization", &format!("Bearer sk-{key}"))]).await;
            assert_eq!(r.status(), 200);
            let (tin, tout) = if stream {
                let sse = read_sse(r).await;
                let last = sse
                    .data
                    .iter()
                    .rev()
                    .find(|d| d.contains("prompt_tokens"))
                    .unwrap();
                told(&serde_json::from_str(last).unwrap())
            } else {
                told(&r.json::<Value>().await.unwrap())
            };
            let e = expected.entry(format!("team-{key}/{model}")).or_default();
            e.0 += 1;
            e.1 += tin + tout;
        }
    }
    let all: u64 = expected.values().map(|e| e.0).sum();
    let tokens: u64 = expected.values().map(|e| e.1).sum();
    let report = eventually_some("every record in the report", WAIT, || async {
        let (status, _, body) = usage_report(gw, "?group_by=key,model").await;
        assert_eq!(status, 200, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        (v["total"]["requests"] == all).then_some(v)
    })
    .await;
    assert_eq!(report["object"], "usage_report");
    assert_eq!(report["group_by"], json!(["key", "model"]));
    assert_eq!(report["truncated"], false);
    let want: Vec<(String, u64, u64)> = expected
        .iter()
        .map(|(k, (n, t))| (k.clone(), *n, *t))
        .collect();
    // Ordered by key, then model; tokens as the clients were told them.
    assert_eq!(report_rows(&report, &["key", "model"]), want);
    assert_eq!(report["total"]["failed"], 0);
    let cost = report["total"]["cost"].as_f64().unwrap();
    assert!(
        (cost - tokens as f64 / 1e6).abs() < 1e-12,
        "{cost} for {tokens} tokens"
    );

    // Filters: a key, a model, a window.
    let (_, _, body) = usage_report(gw, "?key=team-a&group_by=model").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        report_rows(&v, &["model"]),
        vec![
            ("m1".to_string(), 3, expected["team-a/m1"].1),
            ("m2".to_string(), 1, expected["team-a/m2"].1)
        ]
    );
    let (_, _, body) = usage_report(gw, "?model=m1").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["total"]["requests"], 5);
    assert_eq!(v["rows"].as_array().unwrap().len(), 1);
    let (_, _, body) = usage_report(gw, "?from=1h&group_by=day").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    let today = &v["rows"][0]["day"];
    assert_eq!(today.as_str().unwrap().len(), 10, "{v}");
    assert_eq!(v["rows"][0]["requests"], all);
    let (_, _, body) = usage_report(gw, "?from=2099-01-01&group_by=key").await;
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["rows"], json!([]));
    assert_eq!(v["total"]["requests"], 0);

    // CSV: a header and one line a row, the same numbers.
    let (status, ct, csv) = usage_report(gw, "?group_by=key,model&format=csv").await;
    assert_eq!(status, 200);
    assert_eq!(ct, "text/csv; charset=utf-8");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "key,model,requests,failed,tokens_in,tokens_out,cost"
    );
    assert_eq!(lines.len(), 1 + want.len(), "{csv}");
    assert!(lines[1].starts_with("team-a,m1,3,0,"), "{csv}");

    // Refusals name the parameter; only an admin key reads it.
    for (query, param) in [
        ("?group_by=ts", "group_by"),
        ("?from=yesterday", "from"),
        ("?format=xml", "format"),
        ("?keys=team-a", "query"),
        ("?from=2026-12-02&to=2026-12-01T00:00:00Z", "to"),
    ] {
        let r = get_with(
            gw,
            &format!("/admin/usage{query}"),
            &[("authorization", "Bearer sk-admin")],
        )
        .await;
        assert_eq!(r.status(), 400, "{query}");
        let e = envelope(r).await;
        assert_eq!(e["param"], param, "{query}: {e}");
        assert_eq!(e["type"], "invalid_request_error");
    }
    let r = get_with(gw, "/admin/usage", &[("authorization", "Bearer sk-a")]).await;
    assert_eq!(r.status(), 403);

    // The CLI reads the same store from the same config file.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mofa-gateway"))
        .args(["usage", "--config"])
        .arg(&file)
        .args(["--by", "key", "--since", "7d"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines[0],
        [
            "key",
            "requests",
            "failed",
            "tokens_in",
            "tokens_out",
            "cost"
        ]
    );
    assert_eq!(lines[1][..3], ["team-a", "4", "0"], "{text}");
    assert_eq!(lines[2][..3], ["team-b", "2", "0"], "{text}");
    assert_eq!(lines[3][..2], ["total", &all.to_string()], "{text}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mofa-gateway"))
        .args(["usage", "--config"])
        .arg(&file)
        .args(["--since", "last week"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`last week` is not a time"), "{err}");

    // Without a ledger there is nothing to read.
    let off = GatewayBuilder::new()
        .local_model("m", &upstream)
        .start()
        .await;
    let r = get(off, "/admin/usage").await;
    assert_eq!(r.status(), 404);
    assert_eq!(envelope(r).await["code"], "usage_ledger_off");
}

// Redis counters.

#[tokio::test]
async fn replicas_with_their_own_sqlite_share_a_budget_through_redis_even_after_it_restarts_empty()
{
    let mut redis = Redis::start().await;
    let upstream = sim(mofa_gateway::sim::SimOptions {
        tokens_per_sec: 25.0,
        ..sim_opts("m")
    })
    .await;
    let budget = 300;
    let dir = TempDir::new("redis-budget");
    // Each replica its own ledger: only Redis joins their budgets.
    let config = |db: &str| {
        GatewayBuilder::new()
            .usage_sqlite(&dir.0.join(db))
            .key(Key::new("team", "sk-team").token_budget(budget, "month"))
            .limits(|l| {
                l.store("redis")
                    .redis_url(&redis.url())
                    .redis_timeout_ms(500)
            })
            .local_model("m", &upstream)
            .toml()
    };
    let file_a = dir.write("a.toml", &config("a.db"));
    let file_b = dir.write("b.toml", &config("b.db"));
    let (mut bin_a, gw_a) = run_gateway_file(&file_a, &[]).await;
    let (_b, gw_b) = run_gateway_file(&file_b, &[]).await;

    let (told, most) = spend_on_two_replicas(gw_a, gw_b).await;
    // Without a shared count each replica would spend a whole budget of its own.
    assert!(told >= budget, "stopped early: {told} < {budget}");
    assert!(
        told <= budget + 8 * most,
        "{told} tokens against a budget of {budget} ({most} a request)"
    );

    // Redis restarts empty, then replica a restarts: its own ledger holds only part of the
    // spend, but b puts back what it knew into the empty counter, and a reads it at start.
    redis.kill();
    redis.restart().await;
    // The month's label, as the status page gives it.
    let month = get_json(&format!("http://{gw_b}/status.json")).await["spend"]["month"].clone();
    let counter = format!("mofa:{{b:team}}:spend:month:{}", month.as_str().unwrap());
    let client = redis::Client::open(redis.url()).unwrap();
    let seeded: u64 = eventually_some("b seeds the empty counter", WAIT, || {
        let client = client.clone();
        let counter = counter.clone();
        async move {
            let mut c = client.get_multiplexed_async_connection().await.ok()?;
            let v: Option<u64> = redis::cmd("HGET")
                .arg(&counter)
                .arg("tokens")
                .query_async(&mut c)
                .await
                .ok()?;
            v
        }
    })
    .await;
    assert!(seeded >= budget, "seeded with {seeded}");
    bin_a.signal("-TERM");
    bin_a.wait().await;
    let (_a, gw_a) = run_gateway_file(&file_a, &[]).await;
    let r = chat_with(
        gw_a,
        &chat_body("m", false),
        &[("authorization", "Bearer sk-team")],
    )
    .await;
    assert_eq!(
        r.status(),
        429,
        "a restarted replica forgot the other's spend"
    );
    assert_eq!(r.headers()["x-ratelimit-remaining-budget-tokens"], "0");
}
