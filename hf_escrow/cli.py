"""`hf-escrow`: the command line. Tables for people, `--json` for scripts.

Every escrow command works on the embedded ledger (`--agent`, `$HF_ESCROW_AGENT`) or
against a server (`--url`/`$HF_ESCROW_URL` with `--api-key`/`$HF_ESCROW_API_KEY`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from ._exceptions import EscrowError
from ._models import BudgetedKey, Escrow, Hold, Receipt, as_dict
from .cli_datasets import datasets_app
from .cli_jobs import jobs_app
from .cli_ops import add_ops_commands
from .cli_space import space_app
from .cli_options import AgentOpt, DbOpt, JsonOpt, KeyIdOpt, KeyOpt, UrlOpt, ensure_registered, open_client
from .client import connect, embedded_ledger

app = typer.Typer(help="Escrow-backed pay-per-use for Hugging Face workloads.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
console = Console()
err_console = Console(stderr=True)


def _print_version(value: bool) -> None:
    if value:
        from . import __version__
        print(f"hf-escrow {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Escrow-backed pay-per-use for Hugging Face workloads."""


def _run(action, as_json: bool, render) -> None:
    """Run one client call; print its result, or its error with the status as exit code."""
    try:
        result = action()
    except EscrowError as error:
        if as_json:
            print(json.dumps({"error": error.code, "message": error.message, "status": error.status_code}))
        else:
            err_console.print(f"[red]error[/red] ({error.status_code} {error.code}): {error.message}")
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(as_dict(result), indent=2, default=str))
    else:
        render(result)


def _escrow_table(rows: list[Escrow], title: str) -> Table:
    table = Table(title=title)
    amounts = ("amount", "paid", "refunded", "held", "remaining")
    for column in ("id", "status", "buyer", "seller", *amounts, "model"):
        # fold, never cut: an id or an amount shown with an ellipsis is worse than a wrapped one
        table.add_column(column, justify="right" if column in amounts else "left", overflow="fold")
    for e in rows:
        table.add_row(e.id, e.status, e.buyer, e.seller, *(str(getattr(e, name)) for name in amounts), e.model or "")
    return table


def _hold_table(rows: list[Hold], title: str) -> Table:
    table = Table(title=title)
    amounts = ("amount", "captured", "open")
    for column in ("id", "escrow", "holder", "status", *amounts, "expires"):
        table.add_column(column, justify="right" if column in amounts else "left", overflow="fold")
    for h in rows:
        table.add_row(h.id, h.escrow_id, h.holder, h.status, *(str(getattr(h, name)) for name in amounts),
                      h.expires_at.isoformat(timespec="seconds"))
    return table


def _show_hold(h: Hold) -> None:
    console.print(_hold_table([h], f"hold {h.id}"))
    console.print(f"escrow {h.escrow_id}: {h.escrow_status}, {h.escrow_remaining} USDC left to spend")


def _show_escrow(e: Escrow) -> None:
    console.print(_escrow_table([e], f"escrow {e.id}"))
    if e.spend_token:
        console.print(f"spend token (shown once; give it to the seller's paid service): {e.spend_token}")
    if e.events:
        table = Table(title="events")
        for column in ("at", "kind", "actor", "data"):
            table.add_column(column)
        for ev in e.events:
            table.add_row(ev.at.isoformat(timespec="seconds"), ev.kind, ev.actor or "", json.dumps(ev.data))
        console.print(table)


def _show_receipt(r: Receipt) -> None:
    table = Table(title=f"{r.kind} receipt for {r.escrow_id}")
    table.add_column("item")
    table.add_column("USDC", justify="right")
    for name in ("base", "bonus", "gross", "fee", "referral", "net", "refunded", "remaining"):
        table.add_row(name, str(getattr(r, name)))
    console.print(table)
    if r.rounded_from:
        console.print(f"amount {r.rounded_from} was rounded half-even to the micro-USDC")
    console.print(f"status: [bold]{r.status}[/bold]")
    if r.hold:
        console.print(f"hold {r.hold.id}: {r.hold.status}, {r.hold.captured} captured, {r.hold.open} open")


@app.command()
def register(agent_id: str, referral_code: Optional[str] = typer.Option(None, "--referral-code"),
             url: Optional[str] = UrlOpt, database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """Register an agent; prints its API key once."""
    client = open_client(url, None, None, database_url)
    _run(lambda: client.register(agent_id, referral_code), as_json,
         lambda a: console.print(f"registered [bold]{a.agent_id}[/bold]\napi_key: {a.api_key}\n"
                                 f"wallet: {a.wallet}\nreferral_code: {a.referral_code}"))


@app.command()
def claim(url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt, agent: Optional[str] = AgentOpt,
          database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """Claim free test USDC from the faucet."""
    client = open_client(url, api_key, agent, database_url)
    _run(client.claim_faucet, as_json, lambda amount: console.print(f"credited {amount} USDC"))


@app.command("rotate-key")
def rotate_key(url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt, agent: Optional[str] = AgentOpt,
               database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """A new API key for the acting agent, printed once; the old key stops working at once."""
    client = open_client(url, api_key, agent, database_url)
    _run(lambda: {"agent_id": client.agent, "api_key": client.rotate_key()}, as_json,
         lambda r: console.print(f"new api_key: {r['api_key']}\nthe old key no longer works: "
                                 "update HF_ESCROW_API_KEY wherever it was set"))


@app.command()
def balance(url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt, agent: Optional[str] = AgentOpt,
            database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """Balance, referral code and open escrows of the acting agent."""
    client = open_client(url, api_key, agent, database_url)
    _run(client.me, as_json, lambda me: console.print(
        f"{me.agent_id}: [bold]{me.balance} USDC[/bold], {me.escrows_open} open escrows, "
        f"referral code {me.referral_code}, wallet {me.wallet}"))


@app.command()
def create(seller: str, amount: str, ttl: float = typer.Option(3600, "--ttl", help="Seconds until refund."),
           description: Optional[str] = None, meta: Optional[str] = typer.Option(None, help="JSON object."),
           release_condition: Optional[str] = typer.Option(None, help="JSON benchmark condition."),
           bonus_conditions: Optional[str] = typer.Option(None, help="JSON bonus conditions."),
           referral_code: Optional[str] = None, idempotency_key: Optional[str] = KeyIdOpt,
           url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt, agent: Optional[str] = AgentOpt,
           database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """As the buyer: lock AMOUNT USDC in an escrow for SELLER."""
    client = open_client(url, api_key, agent, database_url)
    _run(lambda: client.create_escrow(
        seller, amount, ttl_seconds=ttl, description=description, meta=_json_arg(meta, "--meta"),
        release_condition=_json_arg(release_condition, "--release-condition"),
        bonus_conditions=_json_arg(bonus_conditions, "--bonus-conditions"), referral_code=referral_code,
        idempotency_key=idempotency_key), as_json, _show_escrow)


@app.command()
def deduct(escrow_id: str, amount: str, reason: Optional[str] = None, idempotency_key: Optional[str] = KeyIdOpt,
           url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt, agent: Optional[str] = AgentOpt,
           database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """As the seller: take AMOUNT USDC out of the escrow for work delivered."""
    client = open_client(url, api_key, agent, database_url)
    _run(lambda: client.deduct(escrow_id, amount, reason=reason, idempotency_key=idempotency_key), as_json,
         _show_receipt)


@app.command()
def release(escrow_id: str, amount: Optional[str] = typer.Argument(None, help="Default: the whole remainder."),
            keep_open: bool = typer.Option(False, "--keep-open", help="Do not refund the rest; keep it active."),
            idempotency_key: Optional[str] = KeyIdOpt, url: Optional[str] = UrlOpt,
            api_key: Optional[str] = KeyOpt, agent: Optional[str] = AgentOpt, database_url: Optional[str] = DbOpt,
            as_json: bool = JsonOpt):
    """As the buyer: pay the seller and refund the rest."""
    client = open_client(url, api_key, agent, database_url)
    _run(lambda: client.release(escrow_id, amount, refund_remainder=not keep_open, idempotency_key=idempotency_key),
         as_json, _show_receipt)


@app.command()
def cancel(escrow_id: str, reason: Optional[str] = None, idempotency_key: Optional[str] = KeyIdOpt,
           url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt, agent: Optional[str] = AgentOpt,
           database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """As buyer or seller: refund the whole remainder to the buyer."""
    client = open_client(url, api_key, agent, database_url)
    _run(lambda: client.cancel(escrow_id, reason=reason, idempotency_key=idempotency_key), as_json, _show_receipt)


@app.command()
def get(escrow_id: str, url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt,
        agent: Optional[str] = AgentOpt, database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """One escrow with its events."""
    client = open_client(url, api_key, agent, database_url)
    _run(lambda: client.get(escrow_id), as_json, _show_escrow)


@app.command()
def history(status: Optional[str] = None, limit: int = 20, url: Optional[str] = UrlOpt,
            api_key: Optional[str] = KeyOpt, agent: Optional[str] = AgentOpt, database_url: Optional[str] = DbOpt,
            as_json: bool = JsonOpt):
    """Your escrows, newest first."""
    client = open_client(url, api_key, agent, database_url)
    _run(lambda: client.history(status=status, limit=limit), as_json,
         lambda rows: console.print(_escrow_table(rows, "escrows")))


@app.command()
def hold(target: str = typer.Argument(..., help="A spend token (est_..., as its seller) or an escrow id (as a party)."),
         amount: str = typer.Argument(..., help="USDC to reserve."),
         ttl: float = typer.Option(60, "--ttl", help="Seconds the hold lasts (capped by the ledger)."),
         idempotency_key: Optional[str] = KeyIdOpt, url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt,
         agent: Optional[str] = AgentOpt, database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """Reserve AMOUNT USDC of an escrow for one piece of work; capture or void it after."""
    client = open_client(url, api_key, agent, database_url)
    _run(lambda: client.hold(target, amount, ttl_seconds=ttl, idempotency_key=idempotency_key), as_json, _show_hold)


@app.command()
def capture(hold_id: str, amount: str = typer.Argument(..., help="USDC to pay out of the hold (0 with --final)."),
            final: bool = typer.Option(False, "--final", help="Free the rest of the hold after this capture."),
            idempotency_key: Optional[str] = KeyIdOpt, url: Optional[str] = UrlOpt,
            api_key: Optional[str] = KeyOpt, agent: Optional[str] = AgentOpt, database_url: Optional[str] = DbOpt,
            as_json: bool = JsonOpt):
    """As the hold's maker: pay AMOUNT USDC to the seller out of the hold."""
    client = open_client(url, api_key, agent, database_url)
    _run(lambda: client.capture(hold_id, amount, final=final, idempotency_key=idempotency_key), as_json,
         _show_receipt)


@app.command()
def void(hold_id: str, idempotency_key: Optional[str] = KeyIdOpt, url: Optional[str] = UrlOpt,
         api_key: Optional[str] = KeyOpt, agent: Optional[str] = AgentOpt, database_url: Optional[str] = DbOpt,
         as_json: bool = JsonOpt):
    """As the hold's maker: free the hold's open part back to the escrow."""
    client = open_client(url, api_key, agent, database_url)
    _run(lambda: client.void(hold_id, idempotency_key=idempotency_key), as_json, _show_receipt)


@app.command()
def holds(escrow_id: str, url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt,
          agent: Optional[str] = AgentOpt, database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """The escrow's open holds."""
    client = open_client(url, api_key, agent, database_url)
    _run(lambda: client.holds(escrow_id), as_json, lambda rows: console.print(_hold_table(rows, "open holds")))


tokens_app = typer.Typer(help="Spend tokens: what a seller's paid service holds and captures with.",
                         no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")


@tokens_app.command("mint")
def tokens_mint(escrow_id: str, url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt,
                agent: Optional[str] = AgentOpt, database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """As the buyer: another spend token for an open escrow (shown once)."""
    client = open_client(url, api_key, agent, database_url)
    _run(lambda: {"escrow_id": escrow_id, "spend_token": client.mint_spend_token(escrow_id)}, as_json,
         lambda r: console.print(f"spend token for {escrow_id} (shown once): {r['spend_token']}"))


@tokens_app.command("revoke")
def tokens_revoke(escrow_id: str, url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt,
                  agent: Optional[str] = AgentOpt, database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """As the buyer: revoke every spend token of the escrow at once."""
    client = open_client(url, api_key, agent, database_url)
    _run(lambda: {"escrow_id": escrow_id, "revoked": client.revoke_spend_tokens(escrow_id)}, as_json,
         lambda r: console.print(f"revoked {r['revoked']} spend tokens of {escrow_id}"))


keys_app = typer.Typer(help="Budgeted keys: API keys for sub-agents that lock your money only within a mandate.",
                       no_args_is_help=True)
app.add_typer(keys_app, name="keys")


def _key_table(rows: list[BudgetedKey], title: str) -> Table:
    table = Table(title=title)
    amounts = ("budget", "max_escrow", "locked", "paid", "refunded", "left")
    for column in ("key", "label", *amounts, "sellers", "expires", "state"):
        table.add_column(column, justify="right" if column in amounts else "left", overflow="fold")
    for k in rows:
        state = "active" if k.active else ("revoked" if k.revoked_at else "expired")
        shown = ("any" if getattr(k, name) is None else str(getattr(k, name)) for name in amounts)
        table.add_row(k.key_id, k.label or "", *shown,
                      ", ".join(k.sellers) if k.sellers else "any",
                      k.expires_at.isoformat(timespec="seconds") if k.expires_at else "never", state)
    return table


@keys_app.command("create")
def keys_create(budget: str = typer.Argument(..., help="USDC its escrows may lock, net of refunds."),
                seller: Optional[list[str]] = typer.Option(None, "--seller", help="A seller it may pay (repeat)."),
                max_escrow: Optional[str] = typer.Option(None, "--max-escrow", help="Most USDC per escrow."),
                expires_in: Optional[float] = typer.Option(None, "--expires-in", help="Seconds until it stops."),
                label: Optional[str] = typer.Option(None, "--label"), idempotency_key: Optional[str] = KeyIdOpt,
                url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt, agent: Optional[str] = AgentOpt,
                database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """A budgeted key for a sub-agent; prints its API key once."""
    client = open_client(url, api_key, agent, database_url)
    _run(lambda: client.create_key(budget, sellers=seller or None, max_escrow=max_escrow, expires_in=expires_in,
                                   label=label, idempotency_key=idempotency_key), as_json,
         lambda k: (console.print(_key_table([k], f"key {k.key_id}")),
                    console.print(f"api_key (shown once; give it to the sub-agent): {k.api_key}")))


@keys_app.command("list")
def keys_list(url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt, agent: Optional[str] = AgentOpt,
              database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """Your budgeted keys: mandate, what each locked, paid, got back and has left."""
    client = open_client(url, api_key, agent, database_url)
    _run(client.keys, as_json, lambda rows: console.print(_key_table(rows, "budgeted keys")))


@keys_app.command("show")
def keys_show(key_id: Optional[str] = typer.Argument(None, help="One of your keys; none: the key you act with."),
              url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt, agent: Optional[str] = AgentOpt,
              database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """A key's mandate and what is left (as the key itself: leave KEY_ID out)."""
    client = open_client(url, api_key, agent, database_url)
    _run(lambda: client.mandate(key_id), as_json, lambda k: console.print(_key_table([k], f"key {k.key_id}")))


@keys_app.command("revoke")
def keys_revoke(key_id: str, cancel_escrows: bool = typer.Option(False, "--cancel-escrows",
                                                                  help="Also cancel its active escrows."),
                url: Optional[str] = UrlOpt, api_key: Optional[str] = KeyOpt, agent: Optional[str] = AgentOpt,
                database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """Stop a key at once (its escrows stay yours to cancel or release)."""
    client = open_client(url, api_key, agent, database_url)
    _run(lambda: client.revoke_key(key_id, cancel_escrows=cancel_escrows), as_json,
         lambda k: console.print(f"revoked {k.key_id}; cancelled {len(k.cancelled)} escrows, "
                                 f"{k.in_escrow} USDC still in its escrows"))


@app.command()
def deposit(agent_id: str, amount: str, database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """Operator: credit AGENT_ID with AMOUNT USDC on the embedded/direct ledger."""
    from .money import to_usdc
    _run(lambda: embedded_ledger(database_url).deposit(agent_id, amount), as_json,
         lambda r: console.print(f"{agent_id}: +{to_usdc(r['amount_micro'])} USDC, "
                                 f"balance {to_usdc(r['balance_micro'])}"))


@app.command()
def audit(database_url: Optional[str] = DbOpt, as_json: bool = JsonOpt):
    """Check the ledger's invariants on a database and print its totals; exit 1 on a problem."""
    from .ledger import audit as run_audit
    from .money import format_usdc
    ledger = embedded_ledger(database_url)
    report = run_audit(ledger.engine)
    if as_json:
        print(json.dumps(report, indent=2))
    else:
        table = Table(title=f"audit of {ledger.url}")
        table.add_column("total")
        table.add_column("value", justify="right")
        table.add_row("transactions", str(report["transactions"]))
        for status, count in sorted(report["escrows"].items()):
            table.add_row(f"escrows {status}", str(count))
        for name in ("minted", "agent_balances", "escrow_holdings", "platform_fees"):
            table.add_row(f"{name} (USDC)", format_usdc(report[f"{name}_micro"]))
        console.print(table)
        for problem in report["problems"]:
            err_console.print(f"[red]problem[/red] {problem}")
        console.print("[green]clean: every transaction balances, all accounts sum to zero[/green]"
                      if report["ok"] else "[red]NOT clean[/red]")
    raise typer.Exit(0 if report["ok"] else 1)


@app.command()
def sweep(loop: bool = typer.Option(False, "--loop", help="Keep sweeping until interrupted."),
          interval: float = typer.Option(5.0, help="Seconds between sweeps with --loop."),
          database_url: Optional[str] = DbOpt):
    """Refund escrows past their TTL (safe with several sweepers at once)."""
    ledger = embedded_ledger(database_url)
    while True:
        count = ledger.expire_due()
        console.print(f"expired {count} escrows")
        if not loop:
            return
        time.sleep(interval)


def _json_arg(text: str | None, flag: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        err_console.print(f"[red]error[/red]: {flag} must be JSON: {error}")
        raise typer.Exit(2) from None


@app.command()
def serve(host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
          port: int = typer.Option(8787, help="TCP port."), database_url: Optional[str] = DbOpt,
          workers: int = typer.Option(1, help="Server processes sharing the ledger."),
          pool_size: Optional[int] = typer.Option(
              None, min=2, max=200, help="PostgreSQL connections each worker keeps (as many again in bursts; "
                                         "default $HF_ESCROW_POOL_SIZE, else 5): keep 2 x workers x this under "
                                         "the database's max_connections."),
          faucet: Optional[bool] = typer.Option(
              None, "--faucet/--no-faucet", show_default=False,
              help="Offer free test USDC (default: only when --host is loopback; HF_ESCROW_FAUCET=0 always "
                   "switches it off)."),
          log_json: bool = typer.Option(False, "--log-json", help="Log JSON lines on stderr, one per request, "
                                                                  "with escrow and hold ids (never keys or tokens).")):
    """Run the escrow server (REST, faucet, MCP at /mcp, docs at /docs, /readyz, /metrics)."""
    import os
    import uvicorn
    from .ops.metrics import prepare_workers
    from .serving import fast_loop
    os.environ["HF_ESCROW_FAUCET"] = "1" if _faucet_on(faucet, host, os.environ.get("HF_ESCROW_FAUCET")) else "0"
    metrics_dir = prepare_workers(workers, log_json=log_json)
    if database_url:
        os.environ["HF_ESCROW_DATABASE_URL"] = database_url
    if pool_size is not None:
        os.environ["HF_ESCROW_POOL_SIZE"] = str(pool_size)
    console.print(f"hf-escrow serving on http://{host}:{port} (docs: /docs, MCP: /mcp)")
    try:
        uvicorn.run("hf_escrow.server.app:create_app", factory=True, host=host, port=port, workers=workers,
                    log_level="warning", **fast_loop())
    finally:
        if metrics_dir:
            import shutil
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _faucet_on(flag: bool | None, host: str, env_value: str | None) -> bool:
    """The operator's word (--faucet, or HF_ESCROW_FAUCET=1) turns it on, HF_ESCROW_FAUCET=0
    off whatever else says; unsaid, a server bound only to loopback has one."""
    from .server.faucet import faucet_switch
    from .limits import is_loopback
    switch = faucet_switch(env_value)
    if switch is False:
        return False
    if flag is not None:
        return flag
    return switch is True or is_loopback(host)


@app.command("mcp")
def mcp_stdio(agent: Optional[str] = AgentOpt, database_url: Optional[str] = DbOpt):
    """Serve the MCP tools over stdio for desktop agents (identity: --agent or $HF_ESCROW_API_KEY)."""
    from .server.mcp_tools import build_mcp
    build_mcp(embedded_ledger(database_url), stdio_agent=agent).run()


model_app = typer.Typer(help="The embedded default model (gemma-3-270m, local).", no_args_is_help=True)
app.add_typer(model_app, name="model")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
add_ops_commands(app)
app.add_typer(space_app, name="space")


@model_app.command("prepare")
def model_prepare(force: bool = typer.Option(False, help="Convert again even if cached.")):
    """Convert the packaged GGUF once into a cached transformers folder; prints its path."""
    from .localmodel import prepare_model
    with console.status("preparing gemma-3-270m (about a minute the first time)..."):
        folder = prepare_model(force=force, progress=lambda msg: console.log(msg))
    console.print(str(folder))


@model_app.command("serve")
def model_serve(port: int = typer.Option(8000, help="TCP port."), host: str = typer.Option("127.0.0.1"),
                continuous_batching: bool = typer.Option(False, help="Batch concurrent requests.")):
    """Serve the local model with `transformers serve` (OpenAI-compatible, at /v1)."""
    from .localmodel import prepare_model, serve_model
    folder = prepare_model()
    console.print(f"serving {folder} at http://{host}:{port}/v1 (model name: {folder})")
    process = serve_model(folder, port=port, host=host, continuous_batching=continuous_batching)
    try:
        raise typer.Exit(process.wait())
    except KeyboardInterrupt:
        process.terminate()
        process.wait(10)


@app.command()
def demo(chat: bool = typer.Option(True, "--chat/--no-chat", help="Paid chat on the local model, per token."),
         datasets: bool = typer.Option(True, "--datasets/--no-datasets", help="Paid dataset stream, per shard."),
         space: bool = typer.Option(True, "--space/--no-space", help="Paid Gradio calls, per call."),
         finetune: bool = typer.Option(True, "--finetune/--no-finetune",
                                       help="Benchmark-gated LoRA fine-tune (about a minute)."),
         model_url: Optional[str] = typer.Option(None, help="Chat with this OpenAI-compatible server (…/v1) "
                                                           "instead of starting the local model."),
         model_dir: Optional[Path] = typer.Option(None, help="The model folder to serve (or, with --model-url, "
                                                             "its tokenizer).")):
    """The product end to end on the embedded default: agents, faucet, paid work, receipts, audit."""
    from .demo import run_demo
    report = run_demo(chat=chat, datasets=datasets, space=space, finetune=finetune, model_url=model_url,
                      model_dir=model_dir, console=console)
    raise typer.Exit(0 if report["ok"] else 1)


@app.command()
def gateway(upstream: str = typer.Option(..., help="The OpenAI-compatible server, ending in /v1."),
            seller: Optional[str] = typer.Option(None, "--seller", envvar="HF_ESCROW_AGENT",
                                                 help="Seller agent id (embedded ledger)."),
            pricing: str = typer.Option(..., "--pricing", help="TOML price sheet (input_per_1k = \"0.0005\", ...)."),
            host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8788),
            escrow_url: Optional[str] = typer.Option(None, "--escrow-url", envvar="HF_ESCROW_URL",
                                                     help="Escrow server; embedded ledger if not given."),
            api_key: Optional[str] = KeyOpt, tokenizer: Optional[str] = typer.Option(
                None, help="Local tokenizer path: counts the prompt for each request's hold and the slices "
                           "of a stream as they are captured."),
            hold_ttl: float = typer.Option(
                300.0, "--hold-ttl", min=1,
                help="Seconds a request's hold lives: a stream must end within it, and a crashed gateway's "
                     "holds go back to the buyers after it (the ledger caps it, 15 minutes by default).")):
    """Meter an OpenAI-compatible server: buyers pay per token from their escrows (X-Escrow-Token)."""
    import uvicorn
    from .seller.gateway import create_gateway
    escrow = connect(escrow_url, api_key=api_key) if escrow_url else connect(agent=seller)
    if not escrow_url:
        ensure_registered(escrow, seller)
    app_ = create_gateway(upstream, escrow=escrow, pricing=pricing, tokenizer=tokenizer, hold_ttl_s=hold_ttl)
    console.print(f"gateway on http://{host}:{port}/v1 -> {upstream}")
    uvicorn.run(app_, host=host, port=port, log_level="warning")


if __name__ == "__main__":
    app()
