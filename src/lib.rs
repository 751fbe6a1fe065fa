//! mofa-gateway: an OpenAI-compatible LLM inference gateway.
//!
//! The path of a request: `api` reads and checks it; `orchestrator` admits it (a slot on a
//! deployment chosen by `routing` under the model's policy, a place in the wait queue, or a
//! rejection), with every decision made by the pure core in `admission`; `api` then hands the
//! body to `upstream`, which calls the backend and waits for its first byte; `error` is the one
//! place that turns any failure into a status and an OpenAI error envelope. A failure before
//! the first byte is retried on another deployment; `breaker` keeps failing ones out. `pool`
//! runs the local model servers the gateway launches itself. `config` turns TOML into a
//! validated [`config::Config`]; `sim` is the built-in simulated backend; `server` wires them
//! together and serves until a graceful shutdown.

pub mod admission;
pub mod api;
pub mod breaker;
pub mod config;
pub mod error;
pub mod headers;
pub mod orchestrator;
pub mod pool;
pub mod routing;
pub mod server;
pub mod sim;
pub mod upstream;
