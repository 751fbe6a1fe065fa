#!/usr/bin/env bash
# The cost of translating one streamed OpenAI chunk into Anthropic Messages events
# (src/anthropic/stream.rs, issue 13), per chunk, and the other way, one streamed Messages event
# of an `api = "anthropic"` upstream into OpenAI chunks (src/upstream/messages/stream.rs,
# issue 23), per delta; in release mode: text deltas, tool-argument deltas, and chunks that split
# an SSE line. No network, no servers: a loop over recorded-shape chunks.
# Usage: bench/anthropic.sh    (results go to docs/benchmarks.md by hand, with the commit)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --release --lib anthropic::stream::bench::translation_cost_per_chunk -- --ignored --nocapture 2>&1 \
    | grep -E "anthropic stream translation|ns( per read)?$"
cargo test --release --lib upstream::messages::stream::bench::provider_translation_cost_per_delta -- --ignored --nocapture 2>&1 \
    | grep -E "anthropic provider stream translation|ns( per (read|delta).*)?$"
