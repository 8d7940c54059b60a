"""Paid chat: a Gradio Space whose every answer is paid from the caller's escrow.

    python app.py                  # the port follows GRADIO_SERVER_PORT (default 7860)

Callers pay per answer from an escrow they opened for this Space's seller agent, with the
escrow's spend token (never their API key): agents send it in the X-Escrow-Token header,
people paste it into the page's "Spend token" field.

    from gradio_client import Client
    client = Client(url, headers={"X-Escrow-Token": escrow.spend_token})
    answer, receipt = client.predict("Say hi in French", api_name="/chat")

Settings (environment variables; on a Space, its variables and secrets):

    HF_ESCROW_URL                 escrow server; unset: the embedded ledger in $HF_ESCROW_HOME
    HF_ESCROW_SELLER_KEY          the seller's API key on that server (a secret)
    HF_ESCROW_DATABASE_URL        unset HF_ESCROW_URL: the embedded ledger on PostgreSQL instead
                                  (postgresql+psycopg://...), shared by replicas of the Space
    HF_ESCROW_SELLER              the seller agent id buyers pay (default paid-chat); registered
                                  on first start when the ledger is the embedded one
    HF_ESCROW_PRICE               USDC per answer (default 0.001)
    HF_ESCROW_SPACE_MODEL         a chat model folder or Hub id; unset: the packaged gemma-3-270m,
                                  converted once (about a minute) and cached
    HF_ESCROW_SPACE_INFERENCE_URL an OpenAI-compatible endpoint (TGI, vLLM, transformers serve,
                                  HF Inference Providers) to answer instead of a local model
    HF_ESCROW_SPACE_MAX_TOKENS    tokens per answer (default 96)
    HF_ESCROW_SPACE_CONCURRENCY   answers served at once (default 4)
    HF_ESCROW_SPACE_TRIAL_CALLS   embedded ledger only: calls a "test escrow" covers (default 10)
"""

from __future__ import annotations

import logging
import os
import threading

import gradio as gr

from hf_escrow.gate import Gate, payment_fields, seller_from_env
from hf_escrow.money import format_usdc, parse_usdc, to_decimal

log = logging.getLogger("paid-chat")

MAX_MESSAGE_CHARS = 2000


class Settings:
    """What the environment (or the Space's secrets) configures."""

    def __init__(self, env: dict | None = None):
        env = os.environ if env is None else env
        self.escrow_url = env.get("HF_ESCROW_URL") or None
        self.seller = env.get("HF_ESCROW_SELLER") or "paid-chat"
        self.price = to_decimal(env.get("HF_ESCROW_PRICE") or "0.001", what="HF_ESCROW_PRICE")
        self.model = env.get("HF_ESCROW_SPACE_MODEL") or None
        self.inference_url = env.get("HF_ESCROW_SPACE_INFERENCE_URL") or None
        self.max_tokens = int(env.get("HF_ESCROW_SPACE_MAX_TOKENS") or 96)
        self.concurrency = int(env.get("HF_ESCROW_SPACE_CONCURRENCY") or 4)
        self.trial_calls = int(env.get("HF_ESCROW_SPACE_TRIAL_CALLS") or 10)
        # The "Get a test escrow" button mints test money: off unless the Space's owner says so.
        self.trial = (env.get("HF_ESCROW_SPACE_TRIAL") or "").strip().lower() in ("1", "true", "on", "yes")

    @property
    def embedded(self) -> bool:
        return self.escrow_url is None

    @property
    def trial_amount(self):
        """USDC per test escrow, when the owner turned the button on (embedded ledger only)."""
        return self.price * self.trial_calls if self.embedded and self.trial else None


class LocalChat:
    """A chat model run in this process with transformers (one answer at a time)."""

    def __init__(self, model: str, max_tokens: int):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        local = os.path.isdir(model)
        self.name = os.path.basename(model.rstrip("/")) if local else model
        self.tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=local)
        # bf16 weights compute slowly on most CPUs: float32 there, the saved dtype on a GPU
        dtype = "auto" if torch.cuda.is_available() else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model, local_files_only=local, dtype=dtype).eval()
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.max_tokens = max_tokens
        self._lock = threading.Lock()   # one generate at a time: the tokenizer is not thread-safe

    def __call__(self, message: str) -> str:
        import torch
        inputs = self.tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                                    add_generation_prompt=True, return_tensors="pt", return_dict=True)
        inputs = inputs.to(self.model.device)
        with self._lock, torch.no_grad():
            output = self.model.generate(**inputs, max_new_tokens=self.max_tokens, do_sample=False,
                                         repetition_penalty=1.3)
            new = output[0, inputs["input_ids"].shape[1]:]
            text = self.tokenizer.decode(new, skip_special_tokens=True).strip()
        log.info("answered with %d tokens", len(new))
        return text


class RemoteChat:
    """Answers from an OpenAI-compatible endpoint through huggingface_hub's InferenceClient."""

    def __init__(self, url: str, model: str | None, max_tokens: int):
        from huggingface_hub import InferenceClient
        self.client = InferenceClient(base_url=url, token=os.environ.get("HF_TOKEN"))
        self.name, self.model, self.max_tokens = model or url, model, max_tokens

    def __call__(self, message: str) -> str:
        out = self.client.chat_completion([{"role": "user", "content": message}], model=self.model,
                                          max_tokens=self.max_tokens)
        log.info("answered with %s tokens", out.usage.completion_tokens if out.usage else "?")
        return out.choices[0].message.content or ""


def load_model(settings: Settings):
    """The configured chat backend: a remote endpoint, a given model, or the packaged gemma."""
    if settings.inference_url:
        return RemoteChat(settings.inference_url, settings.model, settings.max_tokens)
    model = settings.model
    if model is None:
        from hf_escrow.localmodel import prepare_model
        model = str(prepare_model(progress=lambda line: log.info("%s", line)))
    return LocalChat(model, settings.max_tokens)


def build_demo(settings: Settings, chat_model, gate: Gate) -> gr.Blocks:
    """The page and its API: `/chat` takes the message first and returns (answer, receipt)."""
    price = format_usdc(parse_usdc(settings.price))   # as the receipts show it: 6 decimals

    @gate.paid(price=settings.price, fields=True, with_receipt=True)
    def chat(message: str) -> str:
        message = (message or "").strip()
        if not message:
            raise gr.Error("Type a message first.", print_exception=False)
        if len(message) > MAX_MESSAGE_CHARS:
            raise gr.Error(f"Messages are limited to {MAX_MESSAGE_CHARS} characters.", print_exception=False)
        return chat_model(message)

    with gr.Blocks(title="Paid chat") as demo:
        gr.Markdown(
            f"# Paid chat\nEvery answer costs **{price} USDC**, paid from your escrow for seller "
            f"`{gate.seller_id}` (model: `{chat_model.name}`). A failed call costs nothing.")
        pay = payment_fields(gate, price=f"{price} USDC per answer",
                             trial_amount=settings.trial_amount)
        chatbot = gr.Chatbot(label="Chat", height=320)
        with gr.Row():
            message = gr.Textbox(label="Message", placeholder="Ask something", scale=5)
            send = gr.Button("Send", variant="primary", scale=1)
        answer = gr.Textbox(label="Answer", visible=False)
        receipt = gr.JSON(label="Receipt of the last answer")
        with gr.Accordion("Pay from code (gradio_client)", open=False):
            gr.Markdown(CLIENT_HELP.replace("SELLER", gate.seller_id))

        def show(history: list, text: str, reply: str, shown: dict):
            history = list(history or []) + [{"role": "user", "content": text},
                                             {"role": "assistant", "content": reply}]
            return history, pay.show(shown), ""

        paid_call = dict(fn=chat, inputs=[message, *pay.inputs], outputs=[answer, receipt])
        after = dict(fn=show, inputs=[chatbot, message, answer, receipt], outputs=[chatbot, pay.balance, message],
                     api_visibility="private")
        send.click(**paid_call, api_name="chat").success(**after)
        message.submit(**paid_call, api_visibility="private").success(**after)
    return demo


CLIENT_HELP = """
```python
from gradio_client import Client
escrow = buyer.create_escrow("SELLER", "0.05")             # as the buyer, with your own key
client = Client(URL, headers={"X-Escrow-Token": escrow.spend_token})   # the token, never your key
answer, receipt = client.predict("Say hi in French", api_name="/chat")
print(answer, receipt["charged_usdc"], receipt["remaining_usdc"])
```
Each answer is held on the ledger before the model runs and captured only when it succeeds; an escrow
that cannot pay is refused before the model runs, and a revoked token or a cancelled escrow stops at once.
"""


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)
    settings = Settings()
    seller = seller_from_env(settings.seller)
    gate = Gate(seller)
    log.info("seller %s on %s; %s USDC per answer", gate.seller_id, settings.escrow_url or "the embedded ledger",
             settings.price)
    chat_model = load_model(settings)
    demo = build_demo(settings, chat_model, gate)
    demo.queue(default_concurrency_limit=settings.concurrency)
    demo.launch(app_kwargs={"routes": gate.discovery_routes()})   # /.well-known/hf-escrow


if __name__ == "__main__":
    main()
