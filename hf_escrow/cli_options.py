"""What every `hf-escrow` command group shares: its options (who acts, on which ledger,
how to print) and the client they open."""

from __future__ import annotations

import typer
from rich.console import Console

from ._exceptions import StateConflict
from .client import EscrowClient, connect

UrlOpt = typer.Option(None, "--url", envvar="HF_ESCROW_URL", help="Escrow server; embedded ledger if not given.")
KeyOpt = typer.Option(None, "--api-key", envvar="HF_ESCROW_API_KEY", help="API key for --url.")
AgentOpt = typer.Option(None, "--agent", envvar="HF_ESCROW_AGENT", help="Acting agent on the embedded ledger.")
DbOpt = typer.Option(None, "--database-url", envvar="HF_ESCROW_DATABASE_URL",
                     help="SQLAlchemy URL of the ledger (default: SQLite in $HF_ESCROW_HOME).")
JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts.")
KeyIdOpt = typer.Option(None, "--idempotency-key", help="Retry-safe key for this mutation.")

_err_console = Console(stderr=True)


def open_client(url: str | None, api_key: str | None, agent: str | None, database_url: str | None) -> EscrowClient:
    """A client over HTTP when `url` is given, else on the embedded ledger as `agent`."""
    if url:
        return connect(url, api_key=api_key)
    return connect(agent=agent, database_url=database_url)


def ensure_registered(client: EscrowClient, agent_id: str | None) -> None:
    """Embedded sellers are registered on first start; a second start finds them."""
    if not agent_id:
        _err_console.print("[red]error[/red]: name the seller with --seller (or HF_ESCROW_AGENT)")
        raise typer.Exit(2)
    try:
        client.register(agent_id)
    except StateConflict:
        pass
