"""`hf-escrow datasets ...`: sell dataset shards over HTTP, paid per shard from buyers' escrows.

The typer sub-app `datasets_app` is mounted by `hf_escrow.cli` as ``hf-escrow datasets``;
it also runs on its own: ``python -m hf_escrow.cli_datasets serve DIR --seller ...``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ._exceptions import EscrowError
from .cli_options import ensure_registered

datasets_app = typer.Typer(help="Sell dataset shards: buyers stream them with `datasets` and pay per shard.",
                           no_args_is_help=True, pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True)


@datasets_app.callback()
def _group() -> None:
    """Sell dataset shards: buyers stream them with `datasets` and pay per shard."""


@datasets_app.command("serve")
def serve(folder: Path = typer.Argument(..., help="Folder of parquet/jsonl/csv/arrow shards, one shard per file.",
                                        exists=True, file_okay=False, dir_okay=True, resolve_path=True),
          seller: Optional[str] = typer.Option(None, "--seller", envvar="HF_ESCROW_AGENT",
                                               help="Seller agent id (embedded ledger; registered if new)."),
          price_per_shard: str = typer.Option(..., "--price-per-shard", help="USDC per shard, e.g. 0.002."),
          host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
          port: int = typer.Option(8790, help="TCP port."),
          escrow_url: Optional[str] = typer.Option(None, "--escrow-url", envvar="HF_ESCROW_URL",
                                                   help="Escrow server; the embedded ledger in $HF_ESCROW_HOME "
                                                        "if not given."),
          api_key: Optional[str] = typer.Option(None, "--api-key", envvar="HF_ESCROW_API_KEY",
                                                help="The seller's API key for --escrow-url."),
          database_url: Optional[str] = typer.Option(None, "--database-url", envvar="HF_ESCROW_DATABASE_URL",
                                                     help="SQLAlchemy URL of the embedded ledger.")):
    """Serve FOLDER's shards at http://HOST:PORT/<path>; each escrow pays a shard once, on first read."""
    import uvicorn

    from .client import connect
    from .money import parse_usdc
    from .seller.shardserver import create_shard_app
    try:
        parse_usdc(price_per_shard, what="--price-per-shard", allow_zero=True)
        if escrow_url:
            if not api_key:
                err_console.print("[red]error[/red]: --escrow-url needs the seller's --api-key")
                raise typer.Exit(2)
            escrow = connect(escrow_url, api_key=api_key)
        else:
            escrow = connect(agent=seller, database_url=database_url)
            ensure_registered(escrow, seller)
        app = create_shard_app(folder, escrow=escrow, price_per_shard=price_per_shard)
        count = len(app.state.shards.files())
        name = app.state.gate.seller if app.state.gate else "free"
    except EscrowError as error:
        err_console.print(f"[red]error[/red] ({error.status_code} {error.code}): {error.message}")
        raise typer.Exit(2) from None
    console.print(f"selling {count} shards of {folder} as [bold]{name}[/bold] at {price_per_shard} USDC per shard "
                  f"on http://{host}:{port}/ (GET / lists them)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


if __name__ == "__main__":
    datasets_app()
