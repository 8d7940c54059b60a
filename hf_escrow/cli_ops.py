"""`hf-escrow backup` / `hf-escrow restore`: the operator's copy of the ledger, audited."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ._exceptions import EscrowError
from .cli_options import DbOpt, JsonOpt

_console = Console()
_err = Console(stderr=True)


def _report(action, as_json: bool, done: str) -> None:
    from .ledger.storage import default_database_url
    try:
        report = action(default_database_url())
    except EscrowError as error:
        _err.print(f"[red]error[/red] ({error.code}): {error.message}")
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        _console.print(f"{done}: {report['transactions']} transactions, escrows {report['escrows']}, "
                       f"audit {'clean' if report['ok'] else 'NOT clean'}")
        for problem in report["problems"]:
            _err.print(f"[red]problem[/red] {problem}")
    raise typer.Exit(0 if report["ok"] else 1)


def add_ops_commands(app: typer.Typer) -> None:
    @app.command()
    def backup(path: Path = typer.Argument(..., help="A new file for the copy."),
               database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
        """Copy the ledger while it serves (SQLite online backup; pg_dump for PostgreSQL), then audit the copy."""
        from .ledger.backup import backup as run_backup
        _report(lambda default: run_backup(database_url or default, path), as_json, f"backed up to {path}")

    @app.command()
    def restore(path: Path = typer.Argument(..., help="A file made by `hf-escrow backup`."),
                database_url: Optional[str] = DbOpt,
                replace: bool = typer.Option(False, "--replace", help="Overwrite a ledger that holds transactions "
                                                                      "(stop its servers first)."),
                as_json: bool = JsonOpt):
        """Load a backup into the ledger (its audit must be clean), then audit the result."""
        from .ledger.backup import restore as run_restore
        _report(lambda default: run_restore(path, database_url or default, replace=replace), as_json,
                f"restored from {path}")
