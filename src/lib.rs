//! mofa-gateway: an OpenAI-compatible LLM inference gateway.
//!
//! Layers, top-down (a module imports only from below it):
//! - `server` (accept loop, shutdown) -> `http` (router, stamp layer, admin views);
//! - `proxy`: the request pipeline, phase by phase (accept, parse, authorize, limit, admit,
//!   route, forward, observe); `error` turns any failure into a status and an envelope;
//! - `orchestrator`: the async shell of admission (per-model locks, queued waiters, permits,
//!   the memory budget that reacts to the pool's events);
//! - `upstream` (one deployment's client and the stream relay) and `pool` (the process
//!   supervisor of the local model servers);
//! - `quota`: the async shell of the rate limits (the memory and Redis stores);
//! - the pure decision core: `admission`, `routing`, `breaker`, `limits` (GCRA buckets), with
//!   `reason` (the closed set of rejections); no I/O, no HTTP crate;
//! - `anthropic`: the Messages API's formats and their translation to and from OpenAI's
//!   (pure; used by `proxy` and `error`, plugged into the relay as a transform);
//! - `config` (validated TOML) and `headers` (names), used by all; `metrics` (the Prometheus
//!   registry and the status page's windows, fed by `proxy::observe`) imports nothing of the
//!   crate; `sim` stands alone.

/// The unit tests (and the benchmarks among them) run on the allocator the binary ships with.
#[cfg(test)]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod config;
pub mod http;
pub mod server;
pub mod sim;

mod admission;
mod anthropic;
#[cfg(test)]
mod benchclock;
mod breaker;
mod error;
mod headers;
mod limits;
mod metrics;
mod orchestrator;
mod pool;
mod proxy;
mod quota;
mod reason;
mod routing;
mod upstream;
mod wire;
