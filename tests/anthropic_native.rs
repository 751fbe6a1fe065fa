//! A Messages client (`POST /v1/messages`) served by a deployment that speaks the Messages API
//! (`api = "anthropic"`): the request goes as the client sent it (the model renamed, the
//! gateway's `priority` removed; fields an OpenAI translation would lose, such as `metadata`,
//! `top_k` and `cache_control`, kept), the reply and the stream come back byte for byte as the
//! backend sent them, a backend's mid-stream error event goes through once; an OpenAI client of
//! the same model is still translated. The backend is the simulator in its Messages mode, on
//! loopback.

mod common;

use common::*;
use mofa_gateway::sim::{spawn_local, SimApi, SimOptions};
use serde_json::{json, Value};

/// A gateway whose model `claude` is the Messages-mode simulator at `sim` (model `mofa-sim`).
async fn gateway(sim: std::net::SocketAddr) -> (TempDir, Binary, std::net::SocketAddr) {
    let dir = TempDir::new("anthropic-native");
    let db = dir.0.join("usage.db");
    let file = dir.write(
        "gateway.toml",
        &format!(
            r#"
[usage]
store = "sqlite"
path = "{}"
flush_interval_ms = 100

[[models]]
name = "claude"
[[models.deployments]]
kind = "cloud"
provider = "anthropic"
api = "anthropic"
url = "http://{sim}"
api_key = "sk-ant-test"
upstream_model = "mofa-sim"
input_price_per_1m = 3.0
output_price_per_1m = 15.0
"#,
            db.display()
        ),
    );
    let (bin, gw) = run_gateway_file(&file, &[]).await;
    (dir, bin, gw)
}

async fn sim(opts: SimOptions) -> std::net::SocketAddr {
    spawn_local(SimOptions {
        api: SimApi::Anthropic,
        api_key: Some("sk-ant-test".into()),
        ..opts
    })
    .await
    .unwrap()
}

fn body(stream: bool) -> Value {
    json!({
        "model": "claude",
        "max_tokens": 6,
        "stream": stream,
        "priority": "high",
        "top_k": 5,
        "metadata": {"user_id": "u-42"},
        "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hello there"}]}],
    })
}

/// What the simulator saw of the last request.
async fn seen(sim: std::net::SocketAddr) -> Value {
    get_json(&format!("http://{sim}/sim/last_request")).await
}

#[tokio::test]
async fn a_messages_request_goes_as_sent_and_its_reply_comes_back_as_the_backend_sent_it() {
    let sim = sim(SimOptions::default()).await;
    let (_dir, _bin, gw) = gateway(sim).await;

    let r = post(gw, "/v1/messages", &body(false)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mofa-backend"], "cloud(anthropic)");
    let got: Value = r.json().await.unwrap();
    // The backend saw the client's body: only the model renamed and the gateway's priority
    // gone; what a translation through the OpenAI form would drop is there.
    let saw = seen(sim).await;
    assert_eq!(saw["path"], "/v1/messages");
    assert_eq!(saw["anthropic_version"], "2023-06-01");
    let mut expected = body(false);
    expected["model"] = json!("mofa-sim");
    expected.as_object_mut().unwrap().remove("priority");
    assert_eq!(saw["body"], expected);
    // The reply is the backend's own: asked directly, it answers the same (but its id).
    let direct = post_with(
        sim,
        "/v1/messages",
        &expected,
        &[("x-api-key", "sk-ant-test")],
    )
    .await
    .json::<Value>()
    .await
    .unwrap();
    let strip = |mut v: Value| {
        v.as_object_mut().unwrap().remove("id");
        v
    };
    assert_eq!(strip(got.clone()), strip(direct), "{got}");
    assert_eq!(got["type"], "message");
    assert_eq!(got["model"], "mofa-sim");
    assert_eq!(got["stop_reason"], "max_tokens");
    assert_eq!(got["usage"]["output_tokens"], 6);

    // Billed from the backend's own usage (a Messages request's spend is counted too).
    let tokens_in = got["usage"]["input_tokens"].as_u64().unwrap();
    let report = eventually_some("the request's record", WAIT, || async {
        let v = get_json(&format!("http://{gw}/admin/usage?group_by=model")).await;
        (v["total"]["requests"] == 1).then_some(v)
    })
    .await;
    assert_eq!(report["rows"][0]["model"], "claude");
    assert_eq!(report["rows"][0]["tokens_in"], tokens_in);
    assert_eq!(report["rows"][0]["tokens_out"], 6);
    let cost = report["rows"][0]["cost"].as_f64().unwrap();
    let want = (tokens_in as f64 * 3.0 + 6.0 * 15.0) / 1e6;
    assert!((cost - want).abs() < 1e-12, "{cost} != {want}");
}

#[tokio::test]
async fn a_messages_stream_is_relayed_event_for_event() {
    let sim = sim(SimOptions::default()).await;
    let (_dir, _bin, gw) = gateway(sim).await;
    let r = post(gw, "/v1/messages", &body(true)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let through = r.text().await.unwrap();
    let mut direct_body = body(true);
    direct_body["model"] = json!("mofa-sim");
    direct_body.as_object_mut().unwrap().remove("priority");
    let direct = post_with(
        sim,
        "/v1/messages",
        &direct_body,
        &[("x-api-key", "sk-ant-test")],
    )
    .await
    .text()
    .await
    .unwrap();
    // The same events in the same order, with the same data but the message's id.
    let events = |t: &str| -> Vec<(String, Value)> {
        t.split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                let (name, data) = e.split_once('\n').unwrap();
                let mut v: Value =
                    serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
                if let Some(m) = v.get_mut("message") {
                    m.as_object_mut().unwrap().remove("id");
                }
                (name.to_string(), v)
            })
            .collect()
    };
    let (a, b) = (events(&through), events(&direct));
    assert_eq!(a, b, "through the gateway:\n{through}\ndirect:\n{direct}");
    assert_eq!(a.first().unwrap().0, "event: message_start");
    assert_eq!(a.last().unwrap().0, "event: message_stop");
    // Nothing of OpenAI's stream format in it.
    assert!(!through.contains("[DONE]") && !through.contains("chat.completion"));
}

#[tokio::test]
async fn a_backends_mid_stream_error_goes_through_once_and_ends_the_stream() {
    let sim = sim(SimOptions {
        die_after_tokens: Some(2),
        ..SimOptions::default()
    })
    .await;
    let (_dir, _bin, gw) = gateway(sim).await;
    let r = post(gw, "/v1/messages", &body(true)).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    assert_eq!(text.matches("event: error").count(), 1, "{text}");
    assert!(text.contains("\"overloaded_error\""), "{text}");
    assert!(!text.contains("message_stop"), "{text}");
    assert!(text.trim_end().ends_with('}'), "{text}");
}

#[tokio::test]
async fn an_openai_client_of_the_same_model_is_still_translated() {
    let sim = sim(SimOptions::default()).await;
    let (_dir, _bin, gw) = gateway(sim).await;
    let mut b = chat_body("claude", false);
    b["max_tokens"] = json!(4);
    let r = chat(gw, &b).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let saw = seen(sim).await;
    assert_eq!(saw["body"]["max_tokens"], 4);
    assert!(saw["body"].get("choices").is_none());
}
