//! A managed model server started through a shell wrapper (`sh -c "... && server"`, no
//! `exec`: the server is the shell's child) never outlives the gateway: not after a SIGKILL of
//! the gateway, an unload, or the death of the server's supervisor. Checked in /proc: no live
//! process is left in the server's process group.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_mofa-gateway");

/// One pool model `a` whose command is a shell wrapper that does not `exec` the server.
fn wrapped() -> GatewayBuilder {
    // The shell line, not a config.
    let line = format!("cd . && {BIN} sim --listen {{host}}:{{port}} --model {{model}}; echo done");
    GatewayBuilder::new().model("a", |m| {
        m.deployment(Deployment::command(&["sh", "-c", &line]).startup_timeout_s(20))
    })
}

/// Live processes (zombies excluded) whose process group is `pgid`.
fn group(pgid: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let fields: Vec<&str> = stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        let live = !matches!(fields.first(), Some(&"Z") | Some(&"X"));
        if live && fields.get(2).and_then(|g| g.parse().ok()) == Some(pgid) {
            out.push(pid);
        }
    }
    out
}

/// Waits up to `secs` (stretched by [`patience`]) for `pgid`'s group to be empty.
async fn group_ends(pgid: u64, secs: u64) -> bool {
    let end = Instant::now() + patience(Duration::from_secs(secs));
    while Instant::now() < end {
        if group(pgid).is_empty() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// Starts `a` with a request; returns the pid of its process (the group's leader).
async fn start(gw: SocketAddr) -> u64 {
    let resp = post(gw, "/v1/chat/completions", &chat_body("a", false)).await;
    assert_eq!(resp.status(), 200);
    let pool = admin(gw, "pool").await;
    let p: &Value = pool["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "a")
        .unwrap();
    let pid = p["pid"].as_u64().unwrap();
    // The supervisor, the wrapper shell and the server at least.
    let members = group(pid);
    assert!(members.len() >= 3, "group {pid}: {members:?}");
    pid
}

#[tokio::test]
async fn sigkill_of_the_gateway_leaves_no_process_of_a_wrapped_server() {
    let (mut gw_proc, gw) = wrapped().start_binary().await;
    let pgid = start(gw).await;
    gw_proc.signal("-KILL");
    gw_proc.wait().await;
    assert!(
        group_ends(pgid, 10).await,
        "left running after SIGKILL of the gateway: {:?}",
        group(pgid)
    );
}

#[tokio::test]
async fn unload_and_a_killed_supervisor_leave_nothing_either() {
    let gw = wrapped().start().await;
    let pgid = start(gw).await;
    let r = post_empty(gw, "/admin/pool/a/unload").await;
    assert_eq!(r.status(), 200);
    assert!(
        group_ends(pgid, 10).await,
        "after unload: {:?}",
        group(pgid)
    );

    // The leader killed from outside: the pool kills what is left of its group.
    let pgid = start(gw).await;
    std::process::Command::new("kill")
        .args(["-KILL", &pgid.to_string()])
        .status()
        .unwrap();
    assert!(
        group_ends(pgid, 10).await,
        "after its supervisor died: {:?}",
        group(pgid)
    );
    // And the next request starts it again.
    start(gw).await;
}
