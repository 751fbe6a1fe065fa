//! The `mofa-gateway` binary as a user runs it: zero-config serve, `sim`, `check-config`, and
//! every command with a stdout whose reader has gone (`| head -1`): a quiet exit, no panic.

mod common;

use common::TempDir;

use common::{addr_of, chat, free_port, model_ids, run_binary as start};
use std::process::{Command, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_mofa-gateway");

#[tokio::test]
async fn zero_config_serves_the_simulated_model() {
    let (_gw, url) = start(&["--listen", "127.0.0.1:0"]).await;
    let resp = chat(
        addr_of(&url),
        &serde_json::json!({"model": "mofa-sim", "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-mofa-backend"], "sim(mofa-sim)");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert!(!v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn sim_subcommand_serves_its_models() {
    let (_sim, url) = start(&[
        "sim",
        "--listen",
        "127.0.0.1:0",
        "--model",
        "a",
        "--model",
        "b",
    ])
    .await;
    let v = common::get_json(&format!("{url}/models")).await;
    let ids = model_ids(&v);
    assert_eq!(ids, ["a", "b"]);
}

#[test]
fn check_config_masks_secrets_and_names_bad_keys() {
    let dir = std::env::temp_dir().join(format!("mofa-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gw.toml");
    std::fs::write(
        &file,
        "[[models]]\nname = \"m\"\n[[models.deployments]]\nkind = \"cloud\"\nprovider = \"openai\"\nurl = \"https://api.example.test/v1\"\napi_key = \"${MOFA_TEST_KEY}\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check-config", file.to_str().unwrap()])
        .env("MOFA_TEST_KEY", "sk-very-secret")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("api_key = \"***\""), "{stdout}");
    assert!(!stdout.contains("sk-very-secret"));

    let out = Command::new(BIN)
        .args(["check-config", file.to_str().unwrap()])
        .env_remove("MOFA_TEST_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("models[0].deployments[0].api_key"),
        "{stderr}"
    );
    assert!(stderr.contains("MOFA_TEST_KEY is not set"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A scratch directory of this test process, removed when dropped.
#[test]
fn check_config_locates_invalid_toml() {
    let dir = TempDir::new("syntax");
    let file = dir
        .write(
            "bad.toml",
            "[[models]]\nname = \"m\"\n[[models.deployments]]\nkind = \"sim\"\nttft_ms = 5 6\n",
        )
        .to_str()
        .unwrap()
        .to_string();
    let out = Command::new(BIN)
        .args(["check-config", &file])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{file}: line 5, column 13: not valid TOML")),
        "{stderr}"
    );
    assert!(stderr.contains("5 | ttft_ms = 5 6"), "{stderr}");
    assert!(stderr.contains("\n  |             ^"), "{stderr}");
}

#[test]
fn check_config_masks_credential_headers_and_redis_password() {
    let dir = TempDir::new("headers");
    let file = dir.write(
        "gw.toml",
        "[limits]\nstore = \"redis\"\nredis_url = \"redis://:${MOFA_TEST_REDIS_PW}@127.0.0.1:6379\"\n\
         [[models]]\nname = \"m\"\n[[models.deployments]]\nkind = \"cloud\"\nprovider = \"p\"\n\
         url = \"https://api.example.test/v1\"\n\
         headers = { \"OpenAI-Organization\" = \"${MOFA_TEST_ORG}\", \"X-Api-Key\" = \"literal-api-secret\", \
         \"x-session-TOKEN\" = \"tok-secret\", \"Cookie\" = \"c=cookie-secret\", \"X-Source\" = \"visible-value\" }\n",
    )
    .to_str()
    .unwrap()
    .to_string();
    let out = Command::new(BIN)
        .args(["check-config", &file])
        .env("MOFA_TEST_ORG", "org-env-secret")
        .env("MOFA_TEST_REDIS_PW", "redis-pw-secret")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for secret in [
        "org-env-secret",
        "literal-api-secret",
        "tok-secret",
        "cookie-secret",
        "redis-pw-secret",
    ] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret}: {stdout}"
        );
    }
    assert!(stdout.contains("OpenAI-Organization = \"***\""), "{stdout}");
    assert!(stdout.contains("visible-value"), "{stdout}");
    assert!(stdout.contains("redis://:***@127.0.0.1:6379"), "{stdout}");
}

#[test]
fn check_config_refuses_a_raw_key_without_repeating_it() {
    let dir = TempDir::new("rawkey");
    let file = dir
        .write(
            "gw.toml",
            "[auth]\nmode = \"keys\"\n[[auth.keys]]\nname = \"a\"\nhash = \"sk-mofa-raw-secret\"\n\
         [[models]]\nname = \"m\"\n[[models.deployments]]\nkind = \"sim\"\n",
        )
        .to_str()
        .unwrap()
        .to_string();
    let out = Command::new(BIN)
        .args(["check-config", &file])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("auth.keys[0].hash"), "{stderr}");
    assert!(stderr.contains("mofa-gateway keys hash"), "{stderr}");
    assert!(!stderr.contains("raw-secret") && !out.stdout.windows(10).any(|w| w == b"raw-secret"));
}

// --- a stdout whose reader has gone ----------------------------------------------------------

/// A stdout for a child whose reader is gone before the child starts (a socket pair with one
/// end closed), so that its first write fails with EPIPE however fast it is (`| head -c0`).
fn closed_pipe() -> Stdio {
    let (reader, writer) = std::os::unix::net::UnixStream::pair().unwrap();
    drop(reader);
    Stdio::from(std::os::fd::OwnedFd::from(writer))
}

/// Runs the binary with `args` and `stdin`, its stdout a pipe with no reader ([`closed_pipe`]);
/// returns its exit code and stderr.
fn with_closed_stdout(args: &[&str], stdin: &str) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn commands_exit_quietly_when_the_reader_of_stdout_has_gone() {
    // `println!` panicked on EPIPE (exit 101, a backtrace on stderr) whenever the reader had
    // left before a line was written: in about half the runs of `keys new | head -1`. Here
    // it has always left, so each run would panic; the repetitions guard against a race.
    let dir = TempDir::new("epipe");
    let file = dir
        .write(
            "gw.toml",
            "[[models]]\nname = \"m\"\n[[models.deployments]]\nkind = \"sim\"\n",
        )
        .to_str()
        .unwrap()
        .to_string();
    let commands: [(&[&str], &str); 4] = [
        (&["keys", "new", "--name", "x"], ""),
        (&["keys", "hash"], "sk-mofa-some-key"),
        (&["check-config", &file], ""),
        (&["--help"], ""),
    ];
    for _ in 0..20 {
        for (args, stdin) in commands {
            let (code, stderr) = with_closed_stdout(args, stdin);
            assert!(
                !stderr.contains("panicked") && !stderr.contains("backtrace"),
                "{args:?}: {stderr}"
            );
            // The reader asked for no more: that is no failure, and nothing to report.
            assert_eq!(code, Some(0), "{args:?}: {stderr}");
            assert!(!stderr.contains("error"), "{args:?}: {stderr}");
        }
    }
}

#[tokio::test]
async fn sim_and_serve_serve_on_when_their_startup_line_cannot_be_printed() {
    for command in ["sim", "serve"] {
        // A free port, named up front: the line that would have said it is lost.
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut child = tokio::process::Command::new(BIN)
            .args([command, "--listen", &listen])
            .stdout(closed_pipe())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let url = format!("http://{listen}/v1/models");
        common::eventually(
            &format!("{command} serving with its stdout closed"),
            common::WAIT,
            || {
                let url = url.clone();
                async move {
                    match reqwest::get(&url).await {
                        Ok(r) => r.status() == 200,
                        Err(_) => false,
                    }
                }
            },
        )
        .await;
        assert!(
            child.try_wait().unwrap().is_none(),
            "{command} exited with its stdout closed"
        );
        // SIGTERM: a graceful stop, which writes the log's last lines.
        let pid = child.id().unwrap().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let out = tokio::time::timeout(common::patience(common::WAIT), child.wait_with_output())
            .await
            .expect("it stops on SIGTERM")
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{command}: {stderr}");
        assert!(stderr.contains("startup line"), "{command}: {stderr}");
        assert_eq!(out.status.code(), Some(0), "{command}: {stderr}");
    }
}
