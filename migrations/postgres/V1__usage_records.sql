-- The usage ledger: one row per finished request (see docs/observability.md).
CREATE TABLE usage_records (
    id               BIGSERIAL PRIMARY KEY,
    request_id       TEXT             NOT NULL,
    ts               TIMESTAMPTZ      NOT NULL, -- when it finished
    key              TEXT,                      -- the API key's configured name (never the key)
    model            TEXT,
    deployment       TEXT,                      -- x-mofa-backend of the deployment that served it
    priority         TEXT,
    endpoint         TEXT             NOT NULL,
    stream           BOOLEAN          NOT NULL,
    status           INTEGER          NOT NULL,
    reason           TEXT             NOT NULL,
    attempts         INTEGER          NOT NULL,
    tokens_in        BIGINT           NOT NULL,
    tokens_out       BIGINT           NOT NULL,
    tokens_estimated BOOLEAN          NOT NULL,
    cost_input       DOUBLE PRECISION NOT NULL,
    cost_output      DOUBLE PRECISION NOT NULL,
    cost             DOUBLE PRECISION NOT NULL,
    ttft_ms          DOUBLE PRECISION,
    total_ms         DOUBLE PRECISION NOT NULL
);
CREATE INDEX usage_records_ts ON usage_records (ts);
CREATE INDEX usage_records_key_ts ON usage_records (key, ts);
CREATE INDEX usage_records_model_ts ON usage_records (model, ts);
