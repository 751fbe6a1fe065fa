use super::*;


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
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].trim(), DEFAULT_CONFIG.trim());
    let c = Config::parse(blocks[1], &|k| Some(format!("value-of-{k}"))).unwrap();
    assert_eq!(c.models.len(), 3);
    assert_eq!(c.models[0].deployments.len(), 4);
    assert!(c.models[1].deployments[0].command.is_some());
    assert_eq!(c.admission.memory_capacity_mb, 24000);
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
    let e = parse(&CLOUD.replace("${KEY}", "${NOPE}")).unwrap_err().to_string();
    assert!(e.starts_with("models[0].deployments[0].api_key:"), "{e}");
    assert!(e.contains("NOPE is not set"), "{e}");
}

#[test]
fn unknown_key_is_named() {
    let e = parse(&CLOUD.replace("api_key", "apikey")).unwrap_err().to_string();
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
