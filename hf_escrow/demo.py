"""`hf-escrow demo`: the product end to end on the embedded default, in one command.

Registers a buyer, a seller and a referrer on the SQLite ledger in `$HF_ESCROW_HOME`,
funds the buyer from the faucet, runs a paid streamed chat against the local
gemma-3-270m served by `transformers serve`, then prints receipts, balances and a clean
audit. Every step moves real (test) USDC through the same ledger.
"""

from __future__ import annotations

import secrets
from typing import Callable

from rich.console import Console
from rich.table import Table

from .client import connect, embedded_ledger
from .ledger import audit

PRICES = {"input_per_1k": "0.0005", "output_per_1k": "0.0015"}


def run_demo(*, chat: bool = True, console: Console | None = None) -> dict:
    """Run the demo; returns the audit report (its `ok` is what the exit code reflects)."""
    console = console or Console()
    tag = secrets.token_hex(3)  # a fresh cast each run, so the demo can run again on one ledger
    names = {"buyer": f"demo-buyer-{tag}", "seller": f"demo-seller-{tag}", "referrer": f"demo-referrer-{tag}"}
    ledger = embedded_ledger()
    console.rule("hf-escrow demo")
    console.print(f"ledger: {ledger.url}")
    referrer = connect(agent=names["referrer"]).register()
    seller = connect(agent=names["seller"])
    seller.register(referral_code=referrer.referral_code)
    buyer = connect(agent=names["buyer"])
    buyer.register()
    console.print(f"faucet credited {buyer.claim_faucet()} USDC to {names['buyer']}")
    steps: list[tuple[str, Callable[[], None]]] = []
    if chat:
        steps.append(("paid chat (streamed) on the local gemma-3-270m", lambda: _chat(buyer, names, console)))
    for title, step in steps:
        console.rule(title)
        step()
    console.rule("balances")
    table = Table()
    for column in ("agent", "role", "balance (USDC)"):
        table.add_column(column)
    for role, name in names.items():
        table.add_row(name, role, str(connect(agent=name).me().balance))
    console.print(table)
    report = audit(ledger.engine)
    console.print("[green]audit clean[/green]: every transaction balances, all accounts sum to zero"
                  if report["ok"] else f"[red]audit found problems[/red]: {report['problems']}")
    return report


def _chat(buyer, names: dict, console: Console) -> None:
    from .inference import paid_inference
    from .localmodel import prepare_model, served_model
    with console.status("preparing the local model (about a minute the first time)..."):
        folder = prepare_model()
    with console.status("starting transformers serve on 127.0.0.1..."):
        server = served_model(folder)
        url = server.__enter__()
    try:
        with paid_inference(url, escrow=buyer, seller=names["seller"], budget="0.05", pricing=PRICES,
                            tokenizer=str(folder)) as client:
            messages = [{"role": "user", "content": "In one sentence: why pay per token?"}]
            for chunk in client.chat_completion(messages, max_tokens=48, stream=True):
                if chunk.choices and chunk.choices[0].delta.content:
                    console.print(chunk.choices[0].delta.content, end="")
            console.print()
            escrow_id = client.escrow_id
            receipt = client.receipts[-1]
    finally:
        server.__exit__(None, None, None)
    escrow = buyer.get(escrow_id)
    console.print(f"tokens in/out: {receipt.tokens_in}/{receipt.tokens_out} (counted by {receipt.counted_by}); "
                  f"paid {receipt.gross} USDC (seller net {receipt.net}, fee {receipt.fee}); "
                  f"refunded {escrow.refunded} of the 0.05 budget; escrow {escrow.status}")
