-- What each key spent per period (UTC day, month, and in all), kept by the ledger's writer in
-- the transaction that inserts the records, so that budgets read a few rows, not the ledger.
CREATE TABLE usage_spend (
    key    TEXT    NOT NULL,
    period TEXT    NOT NULL, -- 'day' | 'month' | 'total'
    label  TEXT    NOT NULL, -- '2026-12-06' | '2026-12' | 'total'
    cost   REAL    NOT NULL,
    tokens INTEGER NOT NULL, -- input + output
    PRIMARY KEY (key, period, label)
);
INSERT INTO usage_spend (key, period, label, cost, tokens)
    SELECT key, 'day', substr(ts, 1, 10), sum(cost), sum(tokens_in + tokens_out)
    FROM usage_records WHERE key IS NOT NULL GROUP BY key, substr(ts, 1, 10);
INSERT INTO usage_spend (key, period, label, cost, tokens)
    SELECT key, 'month', substr(ts, 1, 7), sum(cost), sum(tokens_in + tokens_out)
    FROM usage_records WHERE key IS NOT NULL GROUP BY key, substr(ts, 1, 7);
INSERT INTO usage_spend (key, period, label, cost, tokens)
    SELECT key, 'total', 'total', sum(cost), sum(tokens_in + tokens_out)
    FROM usage_records WHERE key IS NOT NULL GROUP BY key;
