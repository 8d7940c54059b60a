"""Running hf-escrow's HTTP faces in production: the operator's key, /readyz and /metrics,
JSON logs. Shared by the escrow server, the gateway and the shard server; no ledger import."""
