//! One usage record: what a finished request used and cost (made by the observe phase from
//! its one record of the request), and a deployment's prices. Pure: no I/O.

/// A deployment's prices, in currency units per million tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Prices {
    pub input_per_1m: f64,
    pub output_per_1m: f64,
}

impl Prices {
    /// From a deployment's config: `input_price_per_1m` / `output_price_per_1m`, else
    /// `price_per_1k_tokens` for both (x 1000), else 0.
    pub(crate) fn of(d: &crate::config::DeploymentConfig) -> Prices {
        let flat = d.price_per_1k_tokens.map(|p| p * 1000.0);
        Prices {
            input_per_1m: d.input_price_per_1m.or(flat).unwrap_or(0.0),
            output_per_1m: d.output_price_per_1m.or(flat).unwrap_or(0.0),
        }
    }
}

/// One row of `usage_records`. Made on the request path, so it only shares what the request
/// already holds (names, the request id); the writer formats it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct UsageRecord {
    pub request_id: axum::http::HeaderValue,
    /// When it finished (written as RFC 3339 UTC).
    pub ts: std::time::SystemTime,
    pub key: Option<std::sync::Arc<str>>,
    pub model: Option<std::sync::Arc<str>>,
    pub deployment: Option<std::sync::Arc<str>>,
    pub priority: Option<&'static str>,
    pub endpoint: &'static str,
    pub stream: bool,
    pub status: u16,
    pub reason: &'static str,
    pub attempts: u32,
    pub tokens_in: u64,
    pub tokens_out: u64,
    /// Counted by the gateway (the backend sent no `usage`).
    pub tokens_estimated: bool,
    pub cost_input: f64,
    pub cost_output: f64,
    pub cost: f64,
    pub ttft_ms: Option<f64>,
    pub total_ms: f64,
}

impl Prices {
    /// What `input` and `output` tokens cost at these prices: (input, output).
    pub(crate) fn cost(&self, input: u64, output: u64) -> (f64, f64) {
        (
            input as f64 * self.input_per_1m / 1e6,
            output as f64 * self.output_per_1m / 1e6,
        )
    }
}
