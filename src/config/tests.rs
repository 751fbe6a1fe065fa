use super::*;
use crate::admission::Priority;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::parse(text, &|k| (k == "KEY").then(|| "sk-test".to_string()))
}

const CLOUD: &str = r#"
    [[models]]
    name = "m"
    [[models.deployments]]
    kind = "cloud"
    provider = "openai"
    url = "https://api.example.test/v1"
    api_key = "${KEY}"
"#;

/// The examples in docs/configuration.md are valid, and the documented default is the real one.
#[test]
fn documented_examples_parse() {
    let doc = include_str!("../../docs/configuration.md");
    let blocks: Vec<&str> = doc
        .split("```toml")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert_eq!(blocks.len(), 4);
    assert_eq!(blocks[0].trim(), DEFAULT_CONFIG.trim());
    let c = Config::parse(blocks[1], &|k| Some(format!("value-of-{k}"))).unwrap();
    assert_eq!(c.models.len(), 3);
    assert_eq!(c.models[0].deployments.len(), 4);
    assert!(c.models[1].deployments[0].command.is_some());
    assert_eq!(c.admission.memory_capacity_mb, 24000);
    let a = Config::parse(blocks[2], &|k| Some(format!("value-of-{k}"))).unwrap();
    assert_eq!(a.models[0].deployments[0].api, UpstreamApiKind::Anthropic);
    let k = Config::parse(blocks[3], &|k| Some(format!("value-of-{k}"))).unwrap();
    assert_eq!(k.auth.mode, AuthMode::Keys);
    assert_eq!(k.auth.keys.len(), 2);
    assert_eq!(k.limits.store, LimitStore::Redis);
}

#[test]
fn default_config_is_one_sim_model() {
    let c = Config::default_config();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.models.len(), 1);
    assert_eq!(c.models[0].name, "mofa-sim");
    assert_eq!(c.models[0].deployments[0].kind, DeploymentKind::Sim);
    assert_eq!(
        c.models[0].deployments[0].label("mofa-sim"),
        "sim(mofa-sim)"
    );
}

#[test]
fn env_is_interpolated_and_masked() {
    let c = parse(CLOUD).unwrap();
    let d = &c.models[0].deployments[0];
    assert_eq!(d.api_key.as_ref().unwrap().expose(), "sk-test");
    assert_eq!(d.label("m"), "cloud(openai)");
    let shown = c.to_masked_toml();
    assert!(!shown.contains("sk-test"), "{shown}");
    assert!(shown.contains("***"));
    assert!(!format!("{c:?}").contains("sk-test"));
}

#[test]
fn missing_env_names_key_and_variable() {
    let e = parse(&CLOUD.replace("${KEY}", "${NOPE}"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("models[0].deployments[0].api_key:"), "{e}");
    assert!(e.contains("NOPE is not set"), "{e}");
}

#[test]
fn unknown_key_is_named() {
    let e = parse(&CLOUD.replace("api_key", "apikey"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("models[0].deployments[0].apikey"), "{e}");
    assert!(e.contains("unknown field"), "{e}");
}

#[test]
fn bad_values_are_named() {
    let cases = [
        (
            CLOUD.replace("\"cloud\"", "\"gpu\""),
            "models[0].deployments[0].kind",
        ),
        (
            CLOUD.replace("https://api.example.test/v1", "ftp://x"),
            "models[0].deployments[0].url",
        ),
        (
            CLOUD.replace("provider = \"openai\"", ""),
            "models[0].deployments[0].provider",
        ),
        (
            format!("{CLOUD}\nmax_concurrency = 0"),
            "models[0].deployments[0].max_concurrency",
        ),
        (
            format!("{CLOUD}\nttft_ms = 5"),
            "models[0].deployments[0].ttft_ms",
        ),
        (
            format!(
                "{CLOUD}\n[[models]]\nname = \"m\"\n[[models.deployments]]\nkind = \"sim\""
            ),
            "models[1].name",
        ),
        (
            "[[models]]\nname = \"x\"".to_string(),
            "models[0].deployments",
        ),
        (
            "[server]\nlisten = \"nowhere\"".to_string(),
            "server.listen",
        ),
        (String::new(), "models"),
        (format!("{CLOUD}\nmemory_mb = 5"), "models[0].deployments[0].memory_mb"),
        (format!("{CLOUD}\ncommand = [\"x\", \"{{port}}\"]"), "models[0].deployments[0].command"),
        (format!("{CLOUD}\nidle_ttl_s = 5"), "models[0].deployments[0].idle_ttl_s"),
        ("[[models]]\nname = \"x\"\n[[models.deployments]]\nkind = \"local\"\ncommand = [\"srv\"]".to_string(), "models[0].deployments[0].command"),
        ("[[models]]\nname = \"x\"\n[[models.deployments]]\nkind = \"local\"\ncommand = []".to_string(), "models[0].deployments[0].command"),
        ("[[models]]\nname = \"x\"\n[[models.deployments]]\nkind = \"local\"\ncommand = [\"s\", \"{port}\"]\nurl = \"http://a/v1\"".to_string(), "models[0].deployments[0].url"),
        (format!("[admission]\ndefer_threshold = 0.95\n{CLOUD}"), "admission.defer_threshold"),
        (format!("[routing]\npolicy = \"local-only\"\n{CLOUD}"), "routing.policy"),
        (format!("[routing]\npolicy = \"fastest\"\n{CLOUD}"), "routing.policy"),
        (CLOUD.replace("name = \"m\"", "name = \"m\"\npolicy = \"cost\""), "models[0].deployments[0].price_per_1k_tokens"),
        ("[[models]]\nname = \"x\"\npolicy = \"degradation-ladder\"\n[[models.deployments]]\nkind = \"sim\"".to_string(), "models[0].deployments[0].variant"),
    ];
    for (text, key) in cases {
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("{key}:")) || e.starts_with(&format!("{key}.")),
            "want {key}, got {e}"
        );
    }
}

const HASH_A: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const HASH_B: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

fn keyed(extra: &str) -> String {
    format!("[auth]\nmode = \"keys\"\n[[auth.keys]]\nname = \"team-a\"\nhash = \"{HASH_A}\"\n{extra}\n{CLOUD}")
}

#[test]
fn new_sections_have_their_defaults() {
    let c = parse(CLOUD).unwrap();
    assert_eq!(c.auth.mode, AuthMode::None);
    assert!(c.auth.keys.is_empty() && c.auth.admin_keys.is_empty());
    assert_eq!(c.limits.store, LimitStore::Memory);
    assert_eq!(c.limits.redis_failure, RedisFailure::Local);
    assert_eq!(c.limits.redis_timeout_ms, 50);
    assert_eq!(c.log.format, LogFormat::Text);
    assert_eq!((c.models[0].rpm, c.models[0].tpm), (None, None));
}

#[test]
fn keys_parse_with_defaults_and_limits() {
    let c = parse(&format!(
        "{}\n[[auth.keys]]\nname = \"b\"\nhash = \"{HASH_B}\"\nmodels = [\"m\"]\nmax_priority = \"high\"\ndefault_priority = \"low\"\nrpm = 600\ntpm = 200000\nmax_parallel = 16\n",
        keyed("")
    ))
    .unwrap();
    assert_eq!(c.auth.mode, AuthMode::Keys);
    let (a, b) = (&c.auth.keys[0], &c.auth.keys[1]);
    assert_eq!(
        (a.max_priority, a.default_priority),
        (Priority::Critical, Priority::Normal)
    );
    assert_eq!((a.models.as_ref(), a.rpm), (None, None));
    assert_eq!(a.hash.to_string(), HASH_A);
    assert_eq!(
        (b.max_priority, b.default_priority),
        (Priority::High, Priority::Low)
    );
    assert_eq!(
        (b.rpm, b.tpm, b.max_parallel),
        (Some(600), Some(200000), Some(16))
    );
    assert_eq!(b.models.as_deref(), Some(&["m".to_string()][..]));
    // Hashes are not secrets: check-config shows them.
    assert!(c.to_masked_toml().contains(HASH_B));
}

#[test]
fn auth_errors_name_the_key_and_the_fix() {
    let cases = [
        (
            "[auth]\nmode = \"keys\"\n".to_string() + CLOUD,
            "auth.keys",
            "no key is declared",
        ),
        (
            keyed("").replace(HASH_A, "sk-mofa-supersecret"),
            "auth.keys[0].hash",
            "keys hash",
        ),
        (
            keyed("").replace(HASH_A, "sha256:12"),
            "auth.keys[0].hash",
            "64 hex",
        ),
        (
            keyed("").replace("team-a", "team a"),
            "auth.keys[0].name",
            "letters",
        ),
        (
            keyed("models = [\"nope\"]"),
            "auth.keys[0].models[0]",
            "not a configured model",
        ),
        (keyed("models = []"), "auth.keys[0].models", "remove it"),
        (
            keyed("max_priority = \"low\""),
            "auth.keys[0].default_priority",
            "at most \"low\"",
        ),
        (
            keyed("max_priority = \"urgent\""),
            "auth.keys[0].max_priority",
            "unknown variant",
        ),
        (keyed("rpm = 0"), "auth.keys[0].rpm", "at least 1"),
        (
            keyed("max_parallel = 0"),
            "auth.keys[0].max_parallel",
            "at least 1",
        ),
        (
            keyed(&format!(
                "[[auth.keys]]\nname = \"team-a\"\nhash = \"{HASH_B}\""
            )),
            "auth.keys[1].name",
            "twice",
        ),
        (
            keyed(&format!("[[auth.keys]]\nname = \"b\"\nhash = \"{HASH_A}\"")),
            "auth.keys[1].hash",
            "two keys",
        ),
        (
            keyed("").replace("mode = \"keys\"", "mode = \"none\""),
            "auth.mode",
            "mode = \"keys\"",
        ),
        (
            keyed("").replace("mode = \"keys\"", "mode = \"sometimes\""),
            "auth.mode",
            "unknown variant",
        ),
        (
            format!("[auth]\nmode = \"keys\"\nadmin_keys = [\"sk-x\"]\n{CLOUD}"),
            "auth.admin_keys[0]",
            "keys hash",
        ),
    ];
    for (text, key, fix) in cases {
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{key}:")), "want {key}, got {e}");
        assert!(e.contains(fix), "want {fix:?} in {e}");
        assert!(!e.contains("supersecret"), "{e}");
    }
}

#[test]
fn limits_and_log_errors_name_the_key() {
    let cases = [
        (
            "[limits]\nstore = \"redis\"",
            "limits.redis_url",
            "required",
        ),
        (
            "[limits]\nredis_url = \"redis://h:1\"",
            "limits.redis_url",
            "store = \"redis\"",
        ),
        (
            "[limits]\nstore = \"redis\"\nredis_url = \"http://:pw@h\"",
            "limits.redis_url",
            "redis://",
        ),
        (
            "[limits]\nstore = \"disk\"",
            "limits.store",
            "unknown variant",
        ),
        (
            "[limits]\nredis_failure = \"open\"",
            "limits.redis_failure",
            "unknown variant",
        ),
        (
            "[limits]\nredis_timeout_ms = 0",
            "limits.redis_timeout_ms",
            "from 1",
        ),
        ("[log]\nformat = \"xml\"", "log.format", "unknown variant"),
        ("[log]\nlevel = \"debug\"", "log.level", "unknown field"),
    ];
    for (section, key, fix) in cases {
        let e = parse(&format!("{section}\n{CLOUD}"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(&format!("{key}:")), "want {key}, got {e}");
        assert!(e.contains(fix), "want {fix:?} in {e}");
        assert!(!e.contains("pw@"), "{e}");
    }
    for (extra, key) in [("rpm = 0", "models[0].rpm"), ("tpm = 0", "models[0].tpm")] {
        let text = CLOUD.replace("name = \"m\"", &format!("name = \"m\"\n{extra}"));
        let e = parse(&text).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{key}:")), "want {key}, got {e}");
    }
}

#[test]
fn redis_settings_parse_and_the_password_is_masked() {
    let text = format!("[limits]\nstore = \"redis\"\nredis_url = \"redis://:${{KEY}}@127.0.0.1:6379/0\"\nredis_failure = \"closed\"\nredis_timeout_ms = 20\n[log]\nformat = \"json\"\n{CLOUD}");
    let c = parse(&text).unwrap();
    assert_eq!(c.limits.store, LimitStore::Redis);
    assert_eq!(
        c.limits.redis_url.as_deref(),
        Some("redis://:sk-test@127.0.0.1:6379/0")
    );
    assert_eq!(c.limits.redis_failure, RedisFailure::Closed);
    assert_eq!(c.log.format, LogFormat::Json);
    let shown = c.to_masked_toml();
    assert!(!shown.contains("sk-test"), "{shown}");
    assert!(shown.contains("redis://:***@127.0.0.1:6379/0"), "{shown}");
}

#[test]
fn headers_from_env_or_named_like_credentials_are_masked() {
    let text = format!(
        "{CLOUD}\nheaders = {{ \"X-Api-Key\" = \"literal-secret\", \"OpenAI-Organization\" = \"${{KEY}}\", \"X-Source\" = \"gw\" }}"
    );
    let c = parse(&text).unwrap();
    let shown = c.to_masked_toml();
    assert!(
        !shown.contains("literal-secret") && !shown.contains("sk-test"),
        "{shown}"
    );
    assert!(shown.contains("gw"), "{shown}");
    // The config the gateway runs with is unchanged.
    assert_eq!(
        c.models[0].deployments[0].headers["OpenAI-Organization"],
        "sk-test"
    );
}

#[test]
fn keys_file_is_read_relative_to_the_config_and_merged() {
    let dir = std::env::temp_dir().join(format!("mofa-config-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("keys.toml"),
        format!("[[keys]]\nname = \"b\"\nhash = \"{HASH_B}\"\nrpm = 5\n"),
    )
    .unwrap();
    let text = keyed("").replace("[[auth.keys]]", "keys_file = \"keys.toml\"\n[[auth.keys]]");
    let env = |k: &str| (k == "KEY").then(|| "sk-test".to_string());
    let c = Config::parse_in(&text, &env, &dir).unwrap();
    let names: Vec<&str> = c.auth.keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["team-a", "b"]);
    assert_eq!(c.auth.keys[1].rpm, Some(5));
    // The rendering lists the keys inline and does not name the file again.
    let shown = c.to_masked_toml();
    assert!(
        !shown.contains("keys_file") && shown.contains(HASH_B),
        "{shown}"
    );

    std::fs::write(
        dir.join("keys.toml"),
        format!("[[keys]]\nname = \"team-a\"\nhash = \"{HASH_B}\"\n"),
    )
    .unwrap();
    let e = Config::parse_in(&text, &env, &dir).unwrap_err().to_string();
    assert!(
        e.starts_with("auth.keys_file (") && e.contains("keys.toml): keys[0].name"),
        "{e}"
    );
    std::fs::write(
        dir.join("keys.toml"),
        "[[keys]]\nname = \"b\"\nhash = \"sk-oops\"\n",
    )
    .unwrap();
    let e = Config::parse_in(&text, &env, &dir).unwrap_err().to_string();
    assert!(e.contains("keys[0].hash") && !e.contains("sk-oops"), "{e}");
    std::fs::remove_file(dir.join("keys.toml")).unwrap();
    let e = Config::parse_in(&text, &env, &dir).unwrap_err().to_string();
    assert!(
        e.starts_with("auth.keys_file (") && e.contains("cannot read"),
        "{e}"
    );
    // With mode = "keys", keys only in the file are enough.
    std::fs::write(
        dir.join("keys.toml"),
        format!("[[keys]]\nname = \"b\"\nhash = \"{HASH_B}\"\n"),
    )
    .unwrap();
    let only_file = format!("[auth]\nmode = \"keys\"\nkeys_file = \"keys.toml\"\n{CLOUD}");
    assert_eq!(
        Config::parse_in(&only_file, &env, &dir)
            .unwrap()
            .auth
            .keys
            .len(),
        1
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn syntax_errors_are_located() {
    let e = parse("[[models]]\nname = \"m\"\nttft_ms = 5 6\n").unwrap_err();
    assert!(
        matches!(
            e,
            ConfigError::Syntax {
                line: 3,
                column: 13,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("3 | ttft_ms = 5 6"), "{e}");
}

#[test]
fn a_deployment_names_its_api() {
    let cfg = parse(CLOUD).unwrap();
    assert_eq!(cfg.models[0].deployments[0].api, UpstreamApiKind::OpenAi);
    let text = CLOUD.replace("kind = \"cloud\"", "kind = \"cloud\"\napi = \"openai\"");
    assert_eq!(
        parse(&text).unwrap().models[0].deployments[0].api,
        UpstreamApiKind::OpenAi
    );
    let text = CLOUD.replace("kind = \"cloud\"", "kind = \"cloud\"\napi = \"grpc\"");
    let e = parse(&text).unwrap_err().to_string();
    assert!(e.starts_with("models[0].deployments[0].api:"), "{e}");
    assert!(e.contains("unknown variant") && e.contains("openai"), "{e}");
}

#[test]
fn an_anthropic_deployment_and_its_keys() {
    let anthropic = CLOUD
        .replace("kind = \"cloud\"", "kind = \"cloud\"\napi = \"anthropic\"")
        .replace("https://api.example.test/v1", "https://api.anthropic.com");
    let cfg = parse(&anthropic).unwrap();
    let d = &cfg.models[0].deployments[0];
    assert_eq!(d.api, UpstreamApiKind::Anthropic);
    assert_eq!(d.anthropic_version, None);

    let text = format!(
        "{anthropic}\nanthropic_version = \"2024-01-01\"\nheaders = {{ \"anthropic-beta\" = \"tools-2024\" }}"
    );
    let cfg = parse(&text).unwrap();
    let d = &cfg.models[0].deployments[0];
    assert_eq!(d.anthropic_version.as_deref(), Some("2024-01-01"));
    assert_eq!(d.headers["anthropic-beta"], "tools-2024");

    // Each refusal names its key.
    for (extra, at) in [
        ("anthropic_version = \"\"", "anthropic_version"),
        ("anthropic_version = \"a\\nb\"", "anthropic_version"),
        ("headers = { \"X-Api-Key\" = \"k\" }", "headers.X-Api-Key"),
        (
            "headers = { \"anthropic-version\" = \"x\" }",
            "headers.anthropic-version",
        ),
        ("headers = { \"bad name\" = \"x\" }", "headers.bad name"),
        (
            "headers = { \"anthropic-beta\" = \"a\\u0001\" }",
            "headers.anthropic-beta",
        ),
    ] {
        let e = parse(&format!("{anthropic}\n{extra}"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("models[0].deployments[0].{at}:")),
            "{extra}: {e}"
        );
    }
    // `anthropic_version` is Anthropic's only.
    let e = parse(&format!("{CLOUD}\nanthropic_version = \"2023-06-01\""))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("models[0].deployments[0].anthropic_version:"),
        "{e}"
    );
}
