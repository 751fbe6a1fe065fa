//! The harness itself (`tests/common`): what a test sees when a program it needs is missing,
//! and that a typed configuration reaches the gateway as the test wrote it.

mod common;

use common::*;

#[test]
fn a_missing_program_is_named_with_its_debian_package() {
    assert!(require_binary("sh", "dash").is_file());
    let panic = std::panic::catch_unwind(|| {
        require_binary("mofa-no-such-program", "mofa-no-such-package");
    })
    .expect_err("a program not on the PATH is refused");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert_eq!(
        message,
        "mofa-no-such-program not found on PATH: install Debian's `mofa-no-such-package` \
         package (apt-get install mofa-no-such-package), as .ci/run does"
    );
}

#[test]
fn a_built_configuration_is_what_the_test_wrote_and_defaults_the_rest() {
    let cfg = GatewayBuilder::new()
        .server(|s| s.max_body_bytes(2048))
        .admission(|a| a.max_queue(0).defer_threshold(0.8))
        .resilience(|r| r.breaker_failures(2))
        .admin_key("sk-admin")
        .key(
            Key::new("team-a", "sk-a")
                .rpm(20)
                .models(&["m"])
                .max_priority("high"),
        )
        .model("m", |m| {
            m.policy("local-first")
                .deployment(
                    Deployment::local("http://127.0.0.1:9/v1")
                        .max_concurrency(1)
                        .api_key("${TEST_KEY}"),
                )
                .deployment(Deployment::cloud("backup", "http://127.0.0.1:9/v1"))
        })
        .model("s", |m| m.deployment(Deployment::sim()))
        .env("TEST_KEY", "sk-up")
        .config();
    assert_eq!(cfg.server.max_body_bytes, 2048);
    assert_eq!(cfg.server.header_read_timeout_ms, 10_000, "a default");
    assert_eq!(cfg.admission.max_queue, 0);
    assert_eq!(cfg.admission.defer_threshold, 0.8);
    assert_eq!(cfg.resilience.breaker_failures, 2);
    assert_eq!(cfg.auth.admin_keys.len(), 1);
    assert_eq!(cfg.auth.admin_keys[0].to_string(), key_hash("sk-admin"));
    let k = &cfg.auth.keys[0];
    assert_eq!(
        (k.name.as_str(), k.rpm, k.models.as_deref()),
        ("team-a", Some(20), Some(&["m".to_string()][..]))
    );
    assert_eq!(k.hash.to_string(), key_hash("sk-a"));
    let names: Vec<&str> = cfg.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["m", "s"]);
    let m = &cfg.models[0];
    assert_eq!(m.deployments.len(), 2);
    assert_eq!(m.deployments[0].max_concurrency, 1);
    assert_eq!(
        m.deployments[0].api_key.as_ref().map(|k| k.expose()),
        Some("sk-up"),
        "${{TEST_KEY}} interpolated"
    );
    assert_eq!(m.deployments[1].label("m"), "cloud(backup)");
    assert_eq!(m.deployments[1].max_concurrency, 64, "a default");
}
