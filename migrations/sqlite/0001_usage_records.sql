-- The usage ledger: one row per finished request (see docs/observability.md).
CREATE TABLE usage_records (
    id               INTEGER PRIMARY KEY,
    request_id       TEXT    NOT NULL,
    ts               TEXT    NOT NULL, -- when it finished, RFC 3339 UTC with microseconds
    key              TEXT,             -- the API key's configured name (never the key)
    model            TEXT,
    deployment       TEXT,             -- x-mofa-backend of the deployment that served it
    priority         TEXT,
    endpoint         TEXT    NOT NULL,
    stream           INTEGER NOT NULL,
    status           INTEGER NOT NULL,
    reason           TEXT    NOT NULL,
    attempts         INTEGER NOT NULL,
    tokens_in        INTEGER NOT NULL,
    tokens_out       INTEGER NOT NULL,
    tokens_estimated INTEGER NOT NULL,
    cost_input       REAL    NOT NULL,
    cost_output      REAL    NOT NULL,
    cost             REAL    NOT NULL,
    ttft_ms          REAL,
    total_ms         REAL    NOT NULL
);
CREATE INDEX usage_records_ts ON usage_records (ts);
CREATE INDEX usage_records_key_ts ON usage_records (key, ts);
CREATE INDEX usage_records_model_ts ON usage_records (model, ts);
