//! The `mofa-gateway` command: `serve` (the default), `sim`, `check-config` and `keys`
//! (`keys new` mints an API key, `keys hash` hashes one for the config).
//!
//! Nothing here writes with `println!`/`eprintln!`: they panic when the reader of a pipe has
//! gone (`mofa-gateway keys new | head -1`). Output goes through [`print_out`]: a command whose
//! reader left early (EPIPE) exits quietly with 0, as `head` asked for no more; `serve` and
//! `sim` keep serving when their startup line cannot be written (it is only informational).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod logwriter;

/// mimalloc: the request path allocates small buffers on one thread and frees them on another;
/// a perf profile of the proxy path under load showed glibc's malloc waiting on its arena locks.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use mofa_gateway::config::{Config, LogFormat};
use mofa_gateway::sim::{SimApi, SimOptions};
use mofa_gateway::{shutdown_signal, Gateway};

#[derive(Parser)]
#[command(
    name = "mofa-gateway",
    version,
    about = "OpenAI-compatible LLM inference gateway",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// With no subcommand: the options of `serve`.
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gateway (the default). Without --config: one simulated model, `mofa-sim`.
    Serve(ServeArgs),
    /// Serve a simulated model server, OpenAI-compatible or (--api anthropic) speaking
    /// Anthropic's Messages API (tests, benchmarks, demos).
    Sim(SimArgs),
    /// Validate a config file and print it resolved, with secrets masked.
    CheckConfig {
        /// The TOML file to check.
        file: PathBuf,
    },
    /// Print a report of the usage ledger (the store of the config's `[usage]`): requests,
    /// tokens and cost, grouped as asked.
    Usage(UsageArgs),
    /// Mint or hash API keys for `[[auth.keys]]` (the config holds only their hashes).
    #[command(subcommand)]
    Keys(KeysCommand),
    /// `serve` with its config read (internal).
    #[command(skip)]
    Loaded(Box<(Config, ServeArgs)>),
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Print a fresh secret key (once: it is stored nowhere) and the TOML block to paste.
    New {
        /// The key's name, shown in logs and headers instead of the key.
        #[arg(long)]
        name: String,
    },
    /// Read a key on stdin and print its hash (`sha256:<hex>`), for keys minted elsewhere.
    Hash,
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// TOML configuration file (see docs/configuration.md).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Address to listen on; overrides `server.listen`.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Reload the config when its file (or its `keys_file`) changes, as `SIGHUP` does.
    #[arg(long, requires = "config")]
    watch: bool,
}

#[derive(clap::Args)]
struct UsageArgs {
    /// The gateway's TOML config (its `[usage]` names the store).
    #[arg(long, short)]
    config: PathBuf,
    /// Group by key, model, deployment or day (comma-separated or repeated).
    #[arg(long, value_name = "key|model|deployment|day")]
    by: Vec<String>,
    /// Records since: a span back (`24h`, `7d`), a UTC day or month, RFC 3339 (default: all).
    #[arg(long)]
    since: Option<String>,
    /// Records before: as --since; a day or month takes in all of it.
    #[arg(long)]
    until: Option<String>,
    /// Only this key's records (its configured name).
    #[arg(long)]
    key: Option<String>,
    /// Only this model's records.
    #[arg(long)]
    model: Option<String>,
    /// table, csv or json.
    #[arg(long, default_value = "table")]
    format: String,
}

#[derive(clap::Args)]
struct SimArgs {
    /// Address to listen on (port 0: any free port, printed at start).
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: SocketAddr,
    /// The API to speak: `openai` (/v1/chat/completions, ...) or `anthropic` (/v1/messages;
    /// failures are 529 `overloaded_error`, the key may come in `x-api-key`).
    #[arg(long, value_enum, default_value_t = SimApiArg::Openai)]
    api: SimApiArg,
    /// Model ids to serve (repeatable).
    #[arg(long = "model", default_values_t = vec!["mofa-sim".to_string()])]
    models: Vec<String>,
    /// Time to first token, in milliseconds.
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// Tokens per second after the first; 0 means as fast as possible.
    #[arg(long, default_value_t = 0.0)]
    tokens_per_sec: f64,
    /// Requests in flight at once; more get 503. 0 means no limit.
    #[arg(long, default_value_t = 0)]
    max_concurrency: usize,
    /// Share of requests answered with a 500 (--api anthropic: 529), from 0 to 1.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Drop the connection after this many tokens (--api anthropic: a stream ends with an
    /// `error` event instead).
    #[arg(long)]
    die_after_tokens: Option<u64>,
    /// Never answer (requests hang until the client gives up).
    #[arg(long)]
    hang: bool,
    /// Require `Authorization: Bearer <KEY>` (--api anthropic: or `x-api-key: <KEY>`), read
    /// from this environment variable.
    #[arg(long, value_name = "ENV_VAR")]
    api_key_env: Option<String>,
    /// Request bodies larger than this many bytes get 413 (default: the gateway's 20 MiB).
    #[arg(long, default_value_t = mofa_gateway::sim::DEFAULT_MAX_BODY_BYTES)]
    max_body_bytes: usize,
    /// Answer 500 to every request whose raw body contains this string (counted `failed`).
    #[arg(long, value_name = "STR")]
    fail_marker: Option<String>,
}

/// `sim --api`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum SimApiArg {
    Openai,
    Anthropic,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Serve(cli.serve));
    // Flushes the log's last lines when main returns.
    let mut _log_guard = None;
    if !matches!(command, Command::Serve(_)) {
        _log_guard = Some(init_logging(LogFormat::Text));
    }
    if let Command::CheckConfig { file } = &command {
        return match Config::load(file) {
            Ok(cfg) => printed(print_out(&cfg.to_masked_toml())),
            Err(e) => {
                report(format_args!("error: {e}"));
                ExitCode::from(2)
            }
        };
    }
    if let Command::Keys(k) = &command {
        return keys(k);
    }
    // The config is read before the runtime starts: it says how many worker threads to use.
    let (command, workers) = match command {
        Command::Serve(args) => match load_config(&args) {
            Ok(cfg) => {
                // The config says how to log (`[log] format`).
                _log_guard = Some(init_logging(cfg.log.format));
                if args.config.is_none() {
                    tracing::info!(
                        "no --config given: serving the built-in simulated model `mofa-sim`"
                    );
                }
                let workers = cfg.server.worker_threads;
                (Command::Loaded(Box::new((cfg, args))), workers)
            }
            Err(e) => {
                report(format_args!("error: {e}"));
                return ExitCode::from(2);
            }
        },
        other => (other, 0),
    };
    // `serve` runs on lanes (see `Builder::lanes`): this thread's one-thread runtime is
    // the first; `server.worker_threads` (0: one per core) says how many in all.
    let serving = matches!(command, Command::Loaded(_));
    let lanes = match workers {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let mut builder = if serving {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            report(format_args!("error: cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match command {
            Command::Loaded(loaded) => {
                let (cfg, args) = *loaded;
                serve(cfg, &args, lanes).await
            }
            Command::Sim(args) => sim(args).await,
            Command::Usage(args) => usage(args).await,
            Command::Serve(_) | Command::CheckConfig { .. } | Command::Keys(_) => Ok(()),
        }
    });
    rt.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            report(format_args!("error: {e}"));
            ExitCode::from(2)
        }
    }
}

/// Writes `text` to stdout and flushes it, returning what `println!` would panic on (EPIPE
/// when the reader of a pipe has gone, ENOSPC...).
fn print_out(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// The exit code of a command whose output was written with `result`: a reader that left
/// early (EPIPE, `| head -1`) is no failure and is not reported; another error is.
fn printed(result: std::io::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        Err(e) => {
            report(format_args!("error: cannot write to stdout: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// Writes one line to stderr; unlike `eprintln!`, never panics (a closed stderr loses it).
fn report(line: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{line}");
}

/// `keys new` / `keys hash`.
fn keys(k: &KeysCommand) -> ExitCode {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    let hash = |secret: &str| -> String {
        let d = Sha256::digest(secret.as_bytes());
        let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
        format!("sha256:{hex}")
    };
    match k {
        KeysCommand::New { name } => {
            let valid = (1..=64).contains(&name.len())
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !valid {
                report(format_args!(
                    "error: --name must be 1 to 64 of A-Z a-z 0-9 _ . -"
                ));
                return ExitCode::from(2);
            }
            // 256 random bits from the OS.
            let mut raw = [0u8; 32];
            if let Err(e) = getrandom::getrandom(&mut raw) {
                report(format_args!("error: no randomness from the OS: {e}"));
                return ExitCode::FAILURE;
            }
            let secret = format!(
                "sk-mofa-{}",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
            );
            printed(print_out(&format!(
                "{secret}\n\n\
                 # Give the key above to its user; it is shown only this once.\n\
                 # Paste this into the gateway's config:\n\
                 [[auth.keys]]\n\
                 name = \"{name}\"\n\
                 hash = \"{}\"\n",
                hash(&secret)
            )))
        }
        KeysCommand::Hash => {
            let mut input = String::new();
            if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut input) {
                report(format_args!("error: cannot read the key from stdin: {e}"));
                return ExitCode::from(2);
            }
            let secret = input.trim();
            if secret.is_empty() {
                report(format_args!(
                    "error: no key on stdin (e.g. `printf %s \"$KEY\" | mofa-gateway keys hash`)"
                ));
                return ExitCode::from(2);
            }
            printed(print_out(&format!("{}\n", hash(secret))))
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`): readable text, or one JSON object
/// a line with the event's fields at the top level (`[log] format = "json"`).
///
/// Lines are formatted on the thread that logs and written by a dedicated thread
/// ([`logwriter`]: a shared buffer written every 50 ms): a request never waits on a `write`
/// to stderr. The returned guard writes what is left when dropped.
fn init_logging(format: LogFormat) -> logwriter::Guard {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let (writer, guard) = logwriter::start(std::io::stderr());
    // The access log's lines skip tracing's formatter: the gateway writes them itself, into
    // the same writer (see `proxy::observe::line`), still under the filter above.
    let access = writer.clone();
    mofa_gateway::set_access_log_sink(matches!(format, LogFormat::Json), move |line| {
        access.push(line)
    });
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(writer);
    match format {
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
        LogFormat::Text => fmt.init(),
    }
    guard
}

/// The config `serve` runs with: the file, or the built-in default; `--listen` applied.
fn load_config(args: &ServeArgs) -> Result<Config, String> {
    let mut cfg = match &args.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::default_config(),
    };
    if let Some(listen) = args.listen {
        cfg.server.listen = listen;
    }
    Ok(cfg)
}

async fn serve(cfg: Config, args: &ServeArgs, lanes: usize) -> Result<(), String> {
    let listener = tokio::net::TcpListener::bind(cfg.server.listen)
        .await
        .map_err(|e| {
            format!(
                "cannot listen on {}: {e} (server.listen / --listen)",
                cfg.server.listen
            )
        })?;
    let mut builder = Gateway::builder(&cfg).lanes(lanes);
    if let Some(path) = &args.config {
        builder = builder.config_file(path, args.listen);
    }
    let gw = builder.build(listener).await.map_err(|e| e.to_string())?;
    // SIGHUP: read the config file again (the answer is logged).
    let reloader = gw.reloader();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(mut hup) => {
            let reloader = reloader.clone();
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    let _ = reloader.reload().await;
                }
            });
        }
        Err(e) => tracing::warn!("cannot handle SIGHUP ({e}): reload through /admin/reload"),
    }
    if args.watch {
        tokio::spawn(reloader.watch(Duration::from_millis(250)));
    }
    let addr = gw.local_addr().map_err(|e| e.to_string())?;
    let names: Vec<&str> = cfg.models.iter().map(|m| m.name.as_str()).collect();
    // Printed on stdout so that scripts and tests can read the port.
    startup_line(&format!("mofa-gateway listening on http://{addr}\n"));
    tracing::info!(%addr, models = ?names, "mofa-gateway listening");
    let first_signal = async {
        shutdown_signal().await;
        tracing::info!("shutting down (a second signal exits at once)");
        tokio::spawn(async {
            shutdown_signal().await;
            report(format_args!("second signal: exiting now"));
            std::process::exit(130);
        });
    };
    gw.serve(first_signal).await.map_err(|e| e.to_string())
}

/// `mofa-gateway usage`: the report, printed.
async fn usage(args: UsageArgs) -> Result<(), String> {
    let cfg = Config::load(&args.config).map_err(|e| e.to_string())?;
    let by = args.by.join(",");
    let mut params = vec![("format", args.format.as_str())];
    for (name, value) in [
        ("group_by", Some(&by).filter(|b| !b.is_empty())),
        ("from", args.since.as_ref()),
        ("to", args.until.as_ref()),
        ("key", args.key.as_ref()),
        ("model", args.model.as_ref()),
    ] {
        if let Some(v) = value {
            params.push((name, v.as_str()));
        }
    }
    let text = mofa_gateway::usage_report(&cfg.usage, &params)
        .await
        .map_err(|e| {
            // The CLI's flags for the query's names.
            e.replace("`from`", "--since")
                .replace("`to`", "--until")
                .replace("`group_by`", "--by")
        })?;
    match print_out(&text) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(format!("cannot write to stdout: {e}"))
        }
        _ => Ok(()),
    }
}

async fn sim(args: SimArgs) -> Result<(), String> {
    if !(0.0..=1.0).contains(&args.fail_rate) {
        return Err("--fail-rate must be between 0 and 1".into());
    }
    if !(args.tokens_per_sec.is_finite() && args.tokens_per_sec >= 0.0) {
        return Err("--tokens-per-sec must be a number >= 0".into());
    }
    if args.max_body_bytes == 0 {
        return Err("--max-body-bytes must be at least 1".into());
    }
    if args.fail_marker.as_deref() == Some("") {
        return Err("--fail-marker must not be empty".into());
    }
    let api_key = match &args.api_key_env {
        Some(var) => {
            Some(std::env::var(var).map_err(|_| format!("--api-key-env: {var} is not set"))?)
        }
        None => None,
    };
    let opts = SimOptions {
        api: match args.api {
            SimApiArg::Openai => SimApi::OpenAi,
            SimApiArg::Anthropic => SimApi::Anthropic,
        },
        models: args.models,
        ttft: Duration::from_millis(args.ttft_ms),
        tokens_per_sec: args.tokens_per_sec,
        max_concurrency: args.max_concurrency,
        fail_rate: args.fail_rate,
        die_after_tokens: args.die_after_tokens,
        hang: args.hang,
        api_key,
        max_body_bytes: args.max_body_bytes,
        fail_marker: args.fail_marker,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // Printed on stdout so that scripts and tests can read the port.
    startup_line(&format!("mofa-sim listening on http://{addr}/v1\n"));
    tracing::info!(%addr, api = ?opts.api, models = ?opts.models, "simulator listening");
    tokio::select! {
        r = mofa_gateway::sim::serve(listener, opts) => r.map_err(|e| e.to_string()),
        _ = shutdown_signal() => Ok(()),
    }
}

/// Prints the startup line of `serve` or `sim`; if stdout is gone (its reader left: EPIPE),
/// says so in the log and serves on: the address is in the log too.
fn startup_line(line: &str) {
    if let Err(e) = print_out(line) {
        tracing::warn!("cannot print the startup line on stdout ({e}); serving anyway");
    }
}
