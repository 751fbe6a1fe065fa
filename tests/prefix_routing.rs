//! Prefix-aware and session-affinity routing, hermetic: two simulators as two deployments of
//! one model. Each simulator models a server's prompt cache (`/sim/stats` `prompt_cache`: the
//! bytes of each prompt that an earlier prompt it was sent shared), so the tests see what a real
//! server's KV cache would have held, as well as where each request ran (`x-mofa-backend`) and
//! what the gateway judged (`x-mofa-prefix-match`).

mod common;

use std::time::Duration;

use common::*;
use futures_util::{stream, StreamExt};
use mofa_gateway::sim::SimOptions;
use serde_json::{json, Value};

const MODEL: &str = "m";

/// One multi-turn conversation: a system prompt of its own (about 3 KB, distinct from its first
/// words on) and the turns so far, sent again in full each turn, as chat clients do.
struct Conversation {
    messages: Vec<Value>,
}

impl Conversation {
    fn new(n: usize) -> Conversation {
        let mut system = format!("Conversation {n}. You are a careful assistant. ");
        let mut x = n as u64 * 7919 + 1;
        while system.len() < 3000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            system.push_str(
                ["alpha ", "bravo ", "cedar ", "delta ", "ember ", "fjord "]
                    [(x >> 60) as usize % 6],
            );
        }
        Conversation {
            messages: vec![json!({"role": "system", "content": system})],
        }
    }

    /// The next turn's request.
    fn ask(&mut self, turn: usize) -> Value {
        self.messages
            .push(json!({"role": "user", "content": format!("Question {turn}: tell me more.")}));
        json!({"model": MODEL, "messages": self.messages, "max_tokens": 8})
    }

    fn answered(&mut self, reply: &Value) {
        let text = reply["choices"][0]["message"]["content"].clone();
        self.messages
            .push(json!({"role": "assistant", "content": text}));
    }
}

/// What a request got: status, `x-mofa-backend`, `x-mofa-prefix-match`, the body.
struct Answer {
    status: u16,
    backend: String,
    prefix: Option<f64>,
    body: Value,
}

async fn send(gw: std::net::SocketAddr, body: &Value, headers: &[(&str, &str)]) -> Answer {
    let r = chat_with(gw, body, headers).await;
    let status = r.status().as_u16();
    let h = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let backend = h("x-mofa-backend").unwrap_or_default();
    let prefix = h("x-mofa-prefix-match").map(|v| v.parse::<f64>().unwrap());
    let body = r.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        backend,
        prefix,
        body,
    }
}

/// `n` requests of `body` at once; their answers in the order they end.
async fn at_once(gw: std::net::SocketAddr, body: &Value, n: usize) -> Vec<Answer> {
    stream::iter(0..n)
        .map(|_| send(gw, body, &[]))
        .buffer_unordered(n)
        .collect()
        .await
}

/// Two simulators serving `MODEL` with `opts`; their base URLs.
async fn two_sims(opts: impl Fn() -> SimOptions) -> [String; 2] {
    [sim(opts()).await, sim(opts()).await]
}

fn sims_opts() -> SimOptions {
    sim_opts(MODEL)
}

/// `prompt_cache` of the simulator at `url` (`http://addr/v1`).
async fn prompt_cache(url: &str) -> Value {
    let root = url.trim_end_matches("/v1");
    let v = get_json(&format!("{root}/sim/stats")).await;
    v["prompt_cache"].clone()
}

/// A gateway with `policy` over the two simulators (each its own `variant`, so that replies say
/// which: `local(m@a)`, `local(m@b)`).
fn gateway(policy: &str, urls: &[String; 2], max_concurrency: u64) -> GatewayBuilder {
    GatewayBuilder::new().model(MODEL, |m| {
        let m = m.policy(policy);
        urls.iter().zip(["a", "b"]).fold(m, |m, (url, v)| {
            m.deployment(
                Deployment::local(url)
                    .variant(v)
                    .max_concurrency(max_concurrency),
            )
        })
    })
}

/// Runs `conversations` conversations of `turns` turns, one turn of each in turn (so that
/// consecutive requests belong to different conversations); returns each conversation's
/// answers in order.
async fn converse(
    gw: std::net::SocketAddr,
    conversations: usize,
    turns: usize,
) -> Vec<Vec<Answer>> {
    let mut convs: Vec<Conversation> = (0..conversations).map(Conversation::new).collect();
    let mut answers: Vec<Vec<Answer>> = (0..conversations).map(|_| Vec::new()).collect();
    for turn in 1..=turns {
        for (c, conv) in convs.iter_mut().enumerate() {
            let a = send(gw, &conv.ask(turn), &[]).await;
            assert_eq!(a.status, 200, "{}", a.body);
            conv.answered(&a.body);
            answers[c].push(a);
        }
    }
    answers
}

/// The two simulators' cached share of the prompt bytes they were sent.
async fn cached_share(urls: &[String; 2]) -> f64 {
    let (mut bytes, mut cached) = (0.0, 0.0);
    for u in urls {
        let p = prompt_cache(u).await;
        bytes += p["bytes"].as_f64().unwrap();
        cached += p["cached_bytes"].as_f64().unwrap();
    }
    cached / bytes
}

#[tokio::test]
async fn a_conversations_turns_land_on_one_deployment_and_hit_its_cache() {
    let urls = two_sims(sims_opts).await;
    let gw = gateway("prefix-aware", &urls, 8).start().await;
    let answers = converse(gw, 5, 4).await;
    let mut homes = Vec::new();
    for (c, turns) in answers.iter().enumerate() {
        let home = &turns[0].backend;
        assert!(home.starts_with("local(m@"), "{home}");
        for (t, a) in turns.iter().enumerate() {
            assert_eq!(&a.backend, home, "conversation {c} turn {} moved", t + 1);
            let share = a
                .prefix
                .expect("x-mofa-prefix-match on every prefix-aware reply");
            if t == 0 {
                assert_eq!(share, 0.0, "a new conversation matches nothing");
            } else {
                // The earlier turns are most of the prompt.
                assert!(share >= 0.8, "conversation {c} turn {}: {share}", t + 1);
            }
        }
        homes.push(home.clone());
    }
    // New conversations are spread by load (ties in turn): both replicas have some.
    assert!(
        homes.contains(&"local(m@a)".to_string()) && homes.contains(&"local(m@b)".to_string()),
        "{homes:?}"
    );
    let prefix_share = cached_share(&urls).await;

    // The same workload under round-robin, on fresh simulators: turns alternate replicas, and a
    // replica holds only the prompt of two turns before.
    let rr_urls = two_sims(sims_opts).await;
    let rr = gateway("round-robin", &rr_urls, 8).start().await;
    let rr_answers = converse(rr, 5, 4).await;
    let moved = rr_answers
        .iter()
        .filter(|turns| turns.iter().any(|a| a.backend != turns[0].backend))
        .count();
    assert_eq!(moved, 5, "round-robin moves every conversation");
    assert!(
        rr_answers.iter().flatten().all(|a| a.prefix.is_none()),
        "no x-mofa-prefix-match under round-robin"
    );
    let rr_share = cached_share(&rr_urls).await;
    // Turns 2-4 (3 of 4 requests) nearly all cached under prefix-aware; under round-robin only
    // what the replica got two turns before.
    assert!(
        prefix_share > 0.7,
        "prefix-aware cached share {prefix_share}"
    );
    assert!(
        rr_share < prefix_share - 0.15,
        "round-robin {rr_share} vs prefix-aware {prefix_share}"
    );
    println!(
        "cached share of prompt bytes: prefix-aware {prefix_share:.3}, round-robin {rr_share:.3}"
    );

    // Observable: the histogram of matched shares and the index's size.
    let text = get(gw, "/metrics").await.text().await.unwrap();
    promtool_check(&text);
    let count: f64 = text
        .lines()
        .filter(|l| l.starts_with("mofa_gateway_prefix_match_ratio_count{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(count, 20.0, "one observation per request:\n{text}");
    let zero_bucket: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("mofa_gateway_prefix_match_ratio_bucket{") && l.contains("le=\"0\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(
        zero_bucket, 5.0,
        "the five first turns matched nothing:\n{text}"
    );
    let entries = text
        .lines()
        .find(|l| l.starts_with("mofa_gateway_affinity_entries{") && l.contains("kind=\"prefix\""))
        .unwrap_or_else(|| panic!("no affinity gauge:\n{text}"));
    assert!(!entries.ends_with(" 0"), "{entries}");
    let view = admin(gw, "orchestrator").await;
    let a = &view["models"][MODEL]["affinity"];
    assert_eq!(a["kind"], "prefix", "{view}");
    assert_eq!(a["capacity"], 65536, "{view}");
    assert!(
        a["entries"].as_u64().unwrap() > 0 && a["bytes"].as_u64().unwrap() > 0,
        "{view}"
    );
}

#[tokio::test]
async fn the_balance_threshold_and_a_full_replica_move_a_conversation() {
    // Slow replies keep requests in flight while the next arrive.
    let slow = || SimOptions {
        ttft: Duration::from_millis(1500),
        ..sim_opts(MODEL)
    };
    let urls = two_sims(slow).await;
    let gw = gateway("prefix-aware", &urls, 8)
        .routing(|r| r.prefix_balance_threshold(2))
        .start()
        .await;
    let mut conv = Conversation::new(1);
    let first = send(gw, &conv.ask(1), &[]).await;
    assert_eq!(first.status, 200);
    conv.answered(&first.body);
    let home = first.backend.clone();
    // Four requests of the next turn at once: the home replica takes them while it is within 2
    // in flight of the other (0, 1, 2 against 0); the fourth (3 against 0) goes to the other.
    let answers = at_once(gw, &conv.ask(2), 4).await;
    let at_home = answers.iter().filter(|a| a.backend == home).count();
    assert_eq!(
        at_home,
        3,
        "{:?}",
        answers.iter().map(|a| &a.backend).collect::<Vec<_>>()
    );
    let away = answers.iter().find(|a| a.backend != home).unwrap();
    assert_eq!(
        away.prefix,
        Some(0.0),
        "the other replica was never sent the conversation"
    );

    // A replica with every slot taken is not waited for: the other takes the overflow.
    let urls = two_sims(slow).await;
    let gw = gateway("prefix-aware", &urls, 2).start().await;
    let mut conv = Conversation::new(2);
    let first = send(gw, &conv.ask(1), &[]).await;
    conv.answered(&first.body);
    let answers = at_once(gw, &conv.ask(2), 4).await;
    assert!(answers.iter().all(|a| a.status == 200));
    let at_home = answers
        .iter()
        .filter(|a| a.backend == first.backend)
        .count();
    assert_eq!(at_home, 2, "max_concurrency 2 at home, the rest elsewhere");
}

#[tokio::test]
async fn the_index_stays_within_its_bound_under_100_000_distinct_prompts() {
    let urls = two_sims(sims_opts).await;
    let gw = gateway("prefix-aware", &urls, 64)
        .routing(|r| r.prefix_cache_entries(1000))
        .start()
        .await;
    let client = reqwest::Client::new();
    let url = format!("http://{gw}/v1/chat/completions");
    // Each prompt 300 bytes (one 256-byte block), distinct from its first bytes.
    let ok = stream::iter(0..100_000u32)
        .map(|i| {
            let body = json!({"model": MODEL, "max_tokens": 1, "messages": [
                {"role": "user", "content": format!("{i:08} {}", "z".repeat(260))}]});
            let (client, url) = (client.clone(), url.clone());
            async move {
                client
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            }
        })
        .buffer_unordered(32)
        .filter(|s| std::future::ready(matches!(s, Ok(200))))
        .count()
        .await;
    assert_eq!(ok, 100_000);
    let view = admin(gw, "orchestrator").await;
    let a = &view["models"][MODEL]["affinity"];
    assert_eq!(a["capacity"], 1000, "{view}");
    assert_eq!(a["entries"], 1000, "full, and no more: {view}");
    // About 80 bytes an entry (see PrefixIndex::bytes): bounded with the entries.
    let bytes = a["bytes"].as_u64().unwrap();
    assert!((1000..=200_000).contains(&bytes), "{bytes}");
}

#[tokio::test]
async fn a_broken_deployment_is_forgotten_and_a_removed_one_too() {
    // Two simulator processes, so that one can die.
    let mut procs = Vec::new();
    let mut urls = Vec::new();
    for _ in 0..2 {
        let (p, url) = run_binary(&["sim", "--listen", "127.0.0.1:0", "--model", MODEL]).await;
        urls.push(format!("http://{}/v1", addr_of(&url)));
        procs.push(p);
    }
    let urls: [String; 2] = [urls[0].clone(), urls[1].clone()];
    let gw = gateway("prefix-aware", &urls, 8)
        .resilience(|r| r.breaker_failures(3).breaker_open_ms(60_000))
        .start()
        .await;
    let entries = |v: &Value| v["models"][MODEL]["affinity"]["entries"].as_u64().unwrap();
    let mut conv = Conversation::new(3);
    let first = send(gw, &conv.ask(1), &[]).await;
    assert_eq!(first.status, 200);
    conv.answered(&first.body);
    let home = first.backend.clone();
    assert!(entries(&admin(gw, "orchestrator").await) > 0);
    // The home replica dies. Short requests (no whole block of prompt: nothing recorded) fail
    // on it and are retried on the other, until its breaker opens.
    procs[if home == "local(m@a)" { 0 } else { 1 }].signal("-KILL");
    let short =
        json!({"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "hi"}]});
    let mut opened = false;
    for _ in 0..10 {
        let a = send(gw, &short, &[]).await;
        assert_eq!(a.status, 200, "{}", a.body);
        let view = admin(gw, "orchestrator").await;
        if view["models"][MODEL]["deployments"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["breaker"] == "open")
        {
            opened = true;
            assert_eq!(
                entries(&view),
                0,
                "the broken replica's prefixes are forgotten: {view}"
            );
            break;
        }
    }
    assert!(opened, "the dead replica's breaker never opened");
    // The conversation goes on, on the other replica, which was never sent it.
    let a = send(gw, &conv.ask(2), &[]).await;
    assert_eq!(a.status, 200);
    assert_ne!(a.backend, home);
    assert_eq!(a.prefix, Some(0.0));
    assert!(
        entries(&admin(gw, "orchestrator").await) > 0,
        "recorded where it ran"
    );

    // Removed by a reload: what it was sent is forgotten.
    let urls = two_sims(sims_opts).await;
    let dir = TempDir::new("prefix-reload");
    let both = gateway("prefix-aware", &urls, 8);
    let path = dir.replace("gateway.toml", &both.toml());
    let cfg = both.config();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let g = mofa_gateway::Gateway::builder(&cfg)
        .config_file(&path, None)
        .build(listener)
        .await
        .unwrap();
    let reloader = g.reloader();
    let gw = g.spawn().unwrap();
    let mut convs: Vec<Conversation> = (10..12).map(Conversation::new).collect();
    let mut homes = Vec::new();
    for c in &mut convs {
        let a = send(gw, &c.ask(1), &[]).await;
        c.answered(&a.body);
        homes.push(a.backend);
    }
    assert_ne!(
        homes[0], homes[1],
        "two new conversations, one on each replica"
    );
    let before = entries(&admin(gw, "orchestrator").await);
    // Keep only the replica of the first conversation.
    let kept = if homes[0] == "local(m@a)" { 0 } else { 1 };
    let one = GatewayBuilder::new().model(MODEL, |m| {
        m.policy("prefix-aware").deployment(
            Deployment::local(&urls[kept])
                .variant(["a", "b"][kept])
                .max_concurrency(8),
        )
    });
    dir.replace("gateway.toml", &one.toml());
    reloader.reload().await.unwrap();
    let after = entries(&admin(gw, "orchestrator").await);
    assert!(after < before && after > 0, "{before} -> {after}");
    // The kept replica's conversation still matches there.
    let a = send(gw, &convs[0].ask(2), &[]).await;
    assert_eq!(a.backend, homes[0]);
    assert!(a.prefix.unwrap() >= 0.8);
}

/// The pool stops a replica's server when it is idle: its cache goes with it, and so does
/// what the gateway remembered of it; the conversation's next turn is a first turn again.
#[tokio::test]
async fn a_replica_the_pool_stopped_is_forgotten() {
    let replica = |v: &str| {
        Deployment::sim_command(&[])
            .variant(v)
            .memory_mb(40)
            .idle_ttl_s(1)
            .startup_timeout_s(20)
    };
    let gw = GatewayBuilder::new()
        .admission(|a| a.memory_capacity_mb(100))
        .model(MODEL, |m| {
            m.policy("prefix-aware")
                .deployment(replica("a"))
                .deployment(replica("b"))
        })
        .start()
        .await;
    let mut conv = Conversation::new(1);
    let turn = |conv: &mut Conversation, n: usize| {
        let body = conv.ask(n);
        async move { send(gw, &body, &[]).await }
    };
    let first = turn(&mut conv, 1).await;
    assert_eq!(first.status, 200, "{}", first.body);
    conv.answered(&first.body);
    let second = turn(&mut conv, 2).await;
    assert_eq!(second.backend, first.backend);
    assert!(second.prefix.unwrap() >= 0.5, "{:?}", second.prefix);
    conv.answered(&second.body);

    eventually(
        "both servers stopped after their idle TTL",
        Duration::from_secs(10),
        || async {
            let pool = admin(gw, "pool").await;
            let procs = pool["models"].as_array().unwrap().clone();
            procs.len() == 2 && procs.iter().all(|p| p["state"] == "stopped")
        },
    )
    .await;
    let third = turn(&mut conv, 3).await;
    assert_eq!(third.status, 200, "{}", third.body);
    assert_eq!(third.prefix, Some(0.0), "a stopped server's cache is gone");
    conv.answered(&third.body);
    // And learned again from there.
    let fourth = turn(&mut conv, 4).await;
    assert_eq!(fourth.backend, third.backend);
    assert!(fourth.prefix.unwrap() >= 0.5, "{:?}", fourth.prefix);
}

#[tokio::test]
async fn a_session_stays_on_its_deployment() {
    let urls = two_sims(sims_opts).await;
    let gw = gateway("session", &urls, 8).start().await;
    let ask = |user: Option<&str>| {
        let mut b = json!({"model": MODEL, "max_tokens": 2,
            "messages": [{"role": "user", "content": "hello"}]});
        if let Some(u) = user {
            b["user"] = json!(u);
        }
        b
    };
    // By header: each session keeps its replica; ten sessions use both.
    let mut homes = std::collections::BTreeMap::new();
    for round in 0..3 {
        for s in 0..10 {
            let session = format!("session-{s}");
            let a = send(gw, &ask(None), &[("x-mofa-session", &session)]).await;
            assert_eq!(a.status, 200);
            assert_eq!(a.prefix, None, "no prefix match under session");
            let home = homes.entry(s).or_insert_with(|| a.backend.clone());
            assert_eq!(*home, a.backend, "session {s} round {round}");
        }
    }
    let used: std::collections::BTreeSet<&String> = homes.values().collect();
    assert_eq!(used.len(), 2, "{homes:?}");
    // By the body's `user`, and the header wins over it.
    let a = send(gw, &ask(Some("alice")), &[]).await;
    for _ in 0..5 {
        assert_eq!(send(gw, &ask(Some("alice")), &[]).await.backend, a.backend);
    }
    let b = send(gw, &ask(Some("alice")), &[("x-mofa-session", "session-0")]).await;
    assert_eq!(b.backend, homes[&0]);
    let view = admin(gw, "orchestrator").await;
    assert_eq!(view["models"][MODEL]["affinity"]["kind"], "session");
    assert_eq!(view["models"][MODEL]["affinity"]["entries"], 11, "{view}");
}
