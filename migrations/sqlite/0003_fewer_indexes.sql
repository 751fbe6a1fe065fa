-- Every index is written for every record: the embedded store keeps only `ts`, which every
-- report's window uses (a key's or a model's report scans its window). Budgets read
-- `usage_spend`, not the records. PostgreSQL, on a server of its own, keeps all three.
DROP INDEX usage_records_key_ts;
DROP INDEX usage_records_model_ts;
