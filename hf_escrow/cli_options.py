"""The options every `hf-escrow` command group shares: who acts, on which ledger, how to print."""

import typer

UrlOpt = typer.Option(None, "--url", envvar="HF_ESCROW_URL", help="Escrow server; embedded ledger if not given.")
KeyOpt = typer.Option(None, "--api-key", envvar="HF_ESCROW_API_KEY", help="API key for --url.")
AgentOpt = typer.Option(None, "--agent", envvar="HF_ESCROW_AGENT", help="Acting agent on the embedded ledger.")
DbOpt = typer.Option(None, "--database-url", envvar="HF_ESCROW_DATABASE_URL",
                     help="SQLAlchemy URL of the ledger (default: SQLite in $HF_ESCROW_HOME).")
JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts.")
KeyIdOpt = typer.Option(None, "--idempotency-key", help="Retry-safe key for this mutation.")
