"""`hf-escrow space deploy`: a Space template, vendored and pinned, uploaded with huggingface_hub."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from ._exceptions import EscrowError

space_app = typer.Typer(help="Gradio Spaces that bill to escrows.", no_args_is_help=True)
_console = Console()
_err = Console(stderr=True)


@space_app.command("deploy")
def deploy(template: str = typer.Argument(..., help="paid-chat, paid-embeddings, or a folder with an app.py."),
           repo: str = typer.Option(..., "--repo", help="The Space, OWNER/NAME (created if needed)."),
           escrow_url: Optional[str] = typer.Option(None, "--escrow-url",
                                                    help="The escrow server the Space bills through."),
           embedded_ledger: Optional[str] = typer.Option(
               None, "--embedded-ledger", help="Instead of --escrow-url, only on a Space with persistent storage: "
                                               "keep the ledger there (e.g. /data)."),
           seller: Optional[str] = typer.Option(None, "--seller", help="The seller agent id (HF_ESCROW_SELLER)."),
           seller_key: Optional[str] = typer.Option(None, "--seller-key", envvar="HF_ESCROW_SELLER_KEY",
                                                    help="The seller's API key on the escrow server (a Space secret)."),
           var: List[str] = typer.Option([], "--var", help="Another Space variable, NAME=VALUE (repeatable)."),
           private: bool = typer.Option(False, "--private", help="Create the Space private."),
           dry_run: Optional[Path] = typer.Option(None, "--dry-run", help="Write what would be uploaded into this "
                                                                          "folder and touch no hub."),
           token: Optional[str] = typer.Option(None, "--token", envvar="HF_TOKEN", help="Hub token with write access."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")):
    """Write the Space folder (hf_escrow vendored, requirements pinned), create the Space, upload it, set
    its secret and variables."""
    from .spacedeploy import build_space, deploy as upload
    variables = {}
    for item in var:
        name, sep, value = item.partition("=")
        if not sep or not name:
            _err.print(f"[red]error[/red]: --var takes NAME=VALUE, not {item!r}")
            raise typer.Exit(2)
        variables[name] = value
    try:
        with tempfile.TemporaryDirectory(prefix="hf-escrow-space-") as scratch:
            plan = build_space(template, dry_run or Path(scratch) / "space", escrow_url=escrow_url,
                               embedded_ledger=embedded_ledger, seller=seller, seller_key=seller_key,
                               variables=variables)
            result = dict(plan.describe(), repo=repo, private=private, uploaded=dry_run is None)
            if dry_run is None:
                result["url"] = upload(plan, repo, private=private, token=token)
    except EscrowError as error:
        _err.print(f"[red]error[/red] ({error.code}): {error.message}")
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(result, indent=2))
    elif dry_run is not None:
        _console.print(f"wrote {plan.folder} (nothing uploaded); would set variables {plan.variables} and "
                       f"secrets {sorted(plan.secrets)} on {repo}")
    else:
        _console.print(f"deployed {repo}: {result['url']}")
