//! mofa-gateway: an OpenAI-compatible LLM inference gateway.
//!
//! # Embedding
//! What a program needs to run the gateway inside itself, and nothing else, is public:
//! [`config`] (the validated TOML schema: [`config::Config::load`], `parse`,
//! `default_config`), [`Gateway`] (built by [`Gateway::build`] or [`Gateway::builder`], with a
//! typed [`BuildError`]; then [`Gateway::serve`] until a shutdown future such as
//! [`shutdown_signal`] resolves, or [`Gateway::spawn`]), [`Reloader`] (a gateway built with
//! [`Builder::config_file`] reads its file again: [`Gateway::reloader`]),
//! [`set_access_log_sink`] (once per process) and [`sim`] (the simulated backend).
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = mofa_gateway::config::Config::default_config();
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let gw = mofa_gateway::Gateway::build(&cfg, listener).await?;
//! gw.serve(mofa_gateway::shutdown_signal()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Layers
//! Top-down (a module imports only from below it):
//! - `server` (accept loop, lanes, shutdown, the `Reloader`) -> `http` (the `ROUTES` table,
//!   router, stamp layer, admin views, the reload's answer) -> `reload` (the file a reload
//!   reads, `--watch`'s polling);
//! - `proxy`: the request pipeline, phase by phase (accept, parse, authorize, limit, admit,
//!   route, forward, observe), over one request context (`proxy::context`) from which the
//!   finished record is built once, and one config generation swapped whole by a reload; `error` turns any failure into a status and an envelope
//!   from one closed `ErrorKind`;
//! - `wire`: the client APIs behind `ClientApi` (OpenAI in `wire::openai`; Anthropic's
//!   Messages in `anthropic`);
//! - `orchestrator`: the async shell of admission (per-model locks, queued waiters, permits,
//!   the memory budget that reacts to the pool's events);
//! - `upstream` (one deployment's client, the API it speaks behind `upstream::api::UpstreamApi`,
//!   and the stream relay) and `pool` (the process supervisor of the local model servers);
//! - `quota`: the async shell of the rate limits (the memory and Redis stores);
//! - the pure decision core: `admission`, `routing`, `prefix` (the index of prompt prefixes
//!   sent to each deployment, for prefix-aware routing), `breaker`, `limits` (GCRA buckets),
//!   with `reason` (the closed set of rejections); no I/O, no HTTP crate;
//! - `anthropic`: the Messages API's formats and their translation to and from OpenAI's
//!   (pure; used by `proxy` and `error`, plugged into the relay as a transform);
//! - `config` (validated TOML, and the diff between two configs that a reload acts on) and
//!   `headers` (names), used by all; `jsonspan` (where a body's top-level members lie) imports
//!   nothing; `metrics` (the Prometheus
//!   registry and the status page's windows, fed by `proxy::observe`) imports nothing of the
//!   crate; `sim` stands alone.

#![warn(unreachable_pub)]

/// The unit tests (and the benchmarks among them) run on the allocator the binary ships with.
#[cfg(test)]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod config;
pub mod sim;

pub use orchestrator::BuildError;
pub use proxy::observe::line::set_sink as set_access_log_sink;
pub use server::{shutdown_signal, Builder, Gateway, Reloader};

mod http;
mod reload;
mod server;

mod admission;
mod anthropic;
#[cfg(test)]
mod benchclock;
mod breaker;
mod budget;
mod error;
mod headers;
mod jsonspan;
mod limits;
mod metrics;
mod orchestrator;
mod pool;
mod prefix;
mod proxy;
mod quota;
mod reason;
mod routing;
mod upstream;
mod usage;
pub use usage::report_text as usage_report;
mod utc;
mod wire;
