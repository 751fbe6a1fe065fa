//! API keys (issue 10): `keys new` / `keys hash`, 401 / 403, the model list a key sees, the
//! priority ceiling, `/admin/*` behind an admin key, and the secret nowhere in what the
//! gateway prints (its log, its errors, `check-config`, `/admin/*`). The gateway is the real
//! binary, its stderr captured.

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Runs `mofa-gateway keys ARGS` with `stdin`; returns its stdout.
fn keys_cmd(args: &[&str], stdin: &str) -> String {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mofa-gateway"));
    cmd.arg("keys").args(args);
    let out = run_with_stdin(cmd, stdin);
    assert!(
        out.status.success(),
        "keys {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A fresh key from `keys new --name NAME`: its secret and the hash line it printed.
fn new_key(name: &str) -> (String, String) {
    let out = keys_cmd(&["new", "--name", name], "");
    let secret = out.lines().next().unwrap().to_string();
    let hash = out
        .lines()
        .find_map(|l| l.strip_prefix("hash = \""))
        .unwrap()
        .trim_end_matches('"')
        .to_string();
    assert!(out.contains(&format!("name = \"{name}\"")), "{out}");
    (secret, hash)
}

/// The gateway binary on `config`, its stderr written to a file; returns it, its address and
/// the log file.
async fn gateway_logged(config: &str) -> (tokio::process::Child, SocketAddr, std::path::PathBuf) {
    let dir = std::env::temp_dir();
    let stamp = format!(
        "{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    );
    let cfg = dir.join(format!("mofa-keys-{stamp}.toml"));
    let log = dir.join(format!("mofa-keys-{stamp}.log"));
    std::fs::write(&cfg, config).unwrap();
    let (bin, url) = run_binary_logged(&cfg, &log).await;
    (bin, addr_of(&url), log)
}

/// Killed when dropped (`kill_on_drop`).
async fn run_binary_logged(
    cfg: &std::path::Path,
    log: &std::path::Path,
) -> (tokio::process::Child, String) {
    // As common::run_binary, with stderr into `log` and the debug log level.
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_mofa-gateway"))
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut line).await.unwrap();
    let url = line.trim().rsplit(' ').next().unwrap().to_string();
    (child, url)
}

fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

#[tokio::test]
async fn keys_gate_models_priorities_and_admin_and_never_show_the_secret() {
    let (team, team_hash) = new_key("team-a");
    let (other, other_hash) = new_key("team-b");
    let (admin_key, admin_hash) = new_key("ops");
    // `keys hash` agrees with `keys new`.
    assert_eq!(keys_cmd(&["hash"], &format!("{team}\n")).trim(), team_hash);
    // sk-mofa- and at least 128 random bits in base64url.
    let body = team.strip_prefix("sk-mofa-").expect("sk-mofa- prefix");
    assert!(body.len() >= 22, "{team}");
    assert!(body
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));

    let up = sim(sim_opts("small")).await;
    let up2 = sim(sim_opts("big")).await;
    // The hashes `keys new` printed, as an operator pastes them.
    let config = GatewayBuilder::new()
        .admin_hash(&admin_hash)
        .key(
            Key::hashed("team-a", &team_hash)
                .models(&["small"])
                .max_priority("high")
                .default_priority("low"),
        )
        .key(Key::hashed("team-b", &other_hash))
        .local_model("small", &up)
        .local_model("big", &up2)
        .toml();
    let (_gw, gw, log) = gateway_logged(&config).await;
    let mut seen = String::new();

    // No key, a wrong key: 401 invalid_api_key, as OpenAI.
    let r = chat(gw, &chat_body("small", false)).await;
    assert_eq!(r.status(), 401);
    let e = envelope(r).await;
    assert_eq!(e["code"], "invalid_api_key");
    assert_eq!(e["type"], "invalid_request_error");
    let wrong = format!("{team}x");
    let r = chat_with(
        gw,
        &chat_body("small", false),
        &[("authorization", &bearer(&wrong))],
    )
    .await;
    assert_eq!(r.status(), 401);
    let text = r.text().await.unwrap();
    assert!(!text.contains(&wrong) && !text.contains("team-"), "{text}");
    seen += &text;
    // The 401 comes before the body is looked at.
    let r = post_raw(gw, "/v1/chat/completions", Some("text/plain"), "x").await;
    assert_eq!(r.status(), 401);

    // A known key, by Bearer or x-api-key; the default priority applies, and the ceiling
    // lowers what it asks for.
    let auth = bearer(&team);
    let r = chat_with(gw, &chat_body("small", false), &[("authorization", &auth)]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mofa-priority"], "low");
    let r = chat_with(
        gw,
        &chat_body("small", true),
        &[("x-api-key", &team), ("x-mofa-priority", "critical")],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["x-mofa-priority"],
        "high",
        "lowered to max_priority"
    );
    let sse = r.text().await.unwrap();
    assert!(sse.contains("[DONE]"));

    // A model not on the key's list: 403; its model list shows only its models.
    let r = chat_with(gw, &chat_body("big", false), &[("authorization", &auth)]).await;
    assert_eq!(r.status(), 403);
    let e = envelope(r).await;
    assert_eq!(e["code"], "model_not_allowed");
    assert_eq!(e["type"], "permission_error");
    let list: Value = get_with(gw, "/v1/models", &[("authorization", &auth)])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(model_ids(&list), ["small"]);
    let r = get_with(gw, "/v1/models/big", &[("authorization", &auth)]).await;
    assert_eq!(r.status(), 404);
    let list: Value = get_with(gw, "/v1/models", &[("authorization", &bearer(&other))])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(model_ids(&list), ["small", "big"]);
    assert_eq!(get(gw, "/v1/models").await.status(), 401);

    // /admin/* needs the admin key; /healthz and /readyz stay open.
    assert_eq!(get(gw, "/admin/orchestrator").await.status(), 401);
    let r = get_with(gw, "/admin/orchestrator", &[("authorization", &auth)]).await;
    assert_eq!(r.status(), 403);
    for path in ["/admin/orchestrator", "/admin/pool"] {
        let r = get_with(gw, path, &[("authorization", &bearer(&admin_key))]).await;
        assert_eq!(r.status(), 200, "{path}");
        seen += &r.text().await.unwrap();
    }
    assert!(seen.contains("team-a"), "the admin view names keys: {seen}");
    assert_eq!(get(gw, "/healthz").await.status(), 200);
    assert_eq!(get(gw, "/readyz").await.status(), 200);

    // check-config prints the hashes, never a secret.
    let cfg_file = std::env::temp_dir().join(format!("mofa-keys-cc-{}.toml", std::process::id()));
    std::fs::write(&cfg_file, &config).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mofa-gateway"))
        .arg("check-config")
        .arg(&cfg_file)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&cfg_file);
    assert!(out.status.success());
    seen += &String::from_utf8_lossy(&out.stdout);
    seen += &String::from_utf8_lossy(&out.stderr);

    // The log (at debug level) names the key, never the secret. The gateway writes its log
    // every 50 ms: wait for the last access lines.
    eventually(
        "an access log line naming the key",
        Duration::from_secs(5),
        || {
            let log = log.clone();
            async move {
                std::fs::read_to_string(&log)
                    .unwrap_or_default()
                    .contains("\"team-a\"")
            }
        },
    )
    .await;
    let logged = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    assert!(
        logged.contains("\"team-a\""),
        "the access log names the key: {logged}"
    );
    seen += &logged;
    for secret in [&team, &other, &admin_key, &wrong] {
        assert!(!seen.contains(secret.as_str()), "a secret was printed");
    }
}

#[tokio::test]
async fn without_keys_configured_nothing_changes() {
    // mode = "none" (the default): any or no key, every model, no rate-limit headers.
    let up = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new().local_model("m", &up).start().await;
    let r = chat_with(
        gw,
        &chat_body("m", false),
        &[
            ("authorization", "Bearer whatever"),
            ("x-mofa-priority", "critical"),
        ],
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-ratelimit-limit-requests").is_none());
    assert!(r.headers().get("x-mofa-priority").is_none());
    assert_eq!(get(gw, "/admin/orchestrator").await.status(), 200);
}

#[tokio::test]
async fn two_credentials_that_disagree_are_refused_whatever_their_order() {
    let (team, team_hash) = new_key("team-a");
    let (admin_key, admin_hash) = new_key("ops");
    let up = sim(sim_opts("m")).await;
    let gw = GatewayBuilder::new()
        .admin_hash(&admin_hash)
        .key(Key::hashed("team-a", &team_hash))
        .local_model("m", &up)
        .start()
        .await;
    let wrong = "sk-mofa-wrong-0123456789";
    let (ok, bad) = (bearer(&team), bearer(wrong));
    let cases: [(&str, Vec<(&str, &str)>); 6] = [
        (
            "valid then wrong Authorization",
            vec![("authorization", &ok), ("authorization", &bad)],
        ),
        (
            "wrong then valid Authorization",
            vec![("authorization", &bad), ("authorization", &ok)],
        ),
        (
            "the same Authorization twice",
            vec![("authorization", &ok), ("authorization", &ok)],
        ),
        (
            "two x-api-key",
            vec![("x-api-key", &team), ("x-api-key", wrong)],
        ),
        (
            "Authorization and a different x-api-key",
            vec![("authorization", &ok), ("x-api-key", wrong)],
        ),
        (
            "a wrong Authorization and a valid x-api-key",
            vec![("authorization", &bad), ("x-api-key", &team)],
        ),
    ];
    for (what, headers) in &cases {
        let r = chat_with(gw, &chat_body("m", false), headers).await;
        assert_eq!(r.status(), 400, "{what}");
        assert!(r.headers().contains_key("x-request-id"), "{what}");
        let e = envelope(r).await;
        assert_eq!(e["type"], "invalid_request_error", "{what}");
        assert_eq!(e["code"], "ambiguous_credentials", "{what}");
        assert_eq!(e["param"], "authorization", "{what}");
        assert!(!e.to_string().contains(&team), "{what}: the key is echoed");
    }
    // The admin routes the same.
    let a = bearer(&admin_key);
    let r = get_with(
        gw,
        "/admin/orchestrator",
        &[("authorization", &a), ("x-api-key", wrong)],
    )
    .await;
    assert_eq!(r.status(), 400);
    // One key, or the same key both ways, is fine.
    for headers in [
        vec![("authorization", ok.as_str())],
        vec![("x-api-key", team.as_str())],
        vec![("authorization", ok.as_str()), ("x-api-key", team.as_str())],
    ] {
        let r = chat_with(gw, &chat_body("m", false), &headers).await;
        assert_eq!(r.status(), 200, "{headers:?}");
    }
}
