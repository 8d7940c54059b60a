"""Helpers for a paid Space: the seller connected from the environment, the payment widgets,
trial escrows, the discovery route, and the optional imports (gradio, ZeroGPU's `spaces`)."""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ... import challenge
from ..._exceptions import EscrowError, Forbidden, StateConflict, Unauthorized, ValidationError
from ...challenge import TOKEN_HEADER
from ...money import parse_usdc, to_usdc

if TYPE_CHECKING:
    from . import Gate

DEFAULT_SELLER = "space-seller"


def gradio_module() -> Any:
    """The gradio module when it is installed (imported on first use), else None."""
    if "gradio" in sys.modules:
        return sys.modules["gradio"]
    if importlib.util.find_spec("gradio") is None:
        return None
    import gradio
    return gradio


def spaces_gpu() -> Callable | None:
    """ZeroGPU's ``spaces.GPU`` when the `spaces` package is installed, else None (imported on first use)."""
    module = sys.modules.get("spaces")
    if module is None:
        if importlib.util.find_spec("spaces") is None:
            return None
        import spaces as module
    gpu = getattr(module, "GPU", None)   # a folder named spaces/ (Space templates) is no ZeroGPU package
    return gpu if callable(gpu) else None


def discovery_routes(gate: Gate) -> list:
    """The ``/.well-known/hf-escrow`` route of `gate`, for ``demo.launch(app_kwargs={"routes": ...})``."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def discovery(request: Any) -> JSONResponse:
        try:
            return JSONResponse((await run_in_threadpool(gate.offer)).document())
        except EscrowError as error:   # nothing gated yet, or the escrow server is unreachable
            return JSONResponse(error.to_dict(), status_code=404 if isinstance(error, ValidationError)
                                else error.status_code)
    return [Route(challenge.WELL_KNOWN_PATH, discovery, methods=["GET"])]


def seller_from_env(agent: str | None = None, *, register: bool = True) -> Any:
    """The seller's EscrowClient, configured the way a Space is (environment / Space secrets).

    - ``HF_ESCROW_URL`` set: an HTTP client with the seller's key from
      ``HF_ESCROW_SELLER_KEY`` (or ``HF_ESCROW_API_KEY``); if ``HF_ESCROW_SELLER`` (or
      `agent`) is set too, the key must belong to that agent.
    - otherwise the embedded ledger (``$HF_ESCROW_HOME``, or ``HF_ESCROW_DATABASE_URL``)
      acting as `agent` / ``HF_ESCROW_SELLER`` (default ``space-seller``), registered on
      first start when `register` (starting again finds it registered).

    Example:
        >>> seller = seller_from_env("paid-chat")      # embedded: registers once
        >>> seller.agent
        'paid-chat'
    """
    from ...client import connect
    env = os.environ
    agent = agent or env.get("HF_ESCROW_SELLER") or None
    url = env.get("HF_ESCROW_URL")
    if url:
        key = env.get("HF_ESCROW_SELLER_KEY") or env.get("HF_ESCROW_API_KEY")
        if not key:
            raise Unauthorized("HF_ESCROW_URL is set, so the seller's API key is needed: set the Space secret "
                               "HF_ESCROW_SELLER_KEY (from `POST /register` on the escrow server)")
        client = connect(url, api_key=key)
        me = client.me()
        if agent and me.agent_id != agent:
            raise Forbidden(f"HF_ESCROW_SELLER_KEY belongs to agent {me.agent_id!r}, not to HF_ESCROW_SELLER="
                            f"{agent!r}")
        client.agent = me.agent_id
        return client
    agent = agent or env.get("HF_ESCROW_AGENT") or DEFAULT_SELLER
    client = connect(agent=agent)
    if register:
        try:
            client.register(agent)
        except StateConflict:
            pass  # registered by an earlier start (or a twin process starting at the same time)
    return client


@dataclass(frozen=True)
class PaymentFields:
    """The payment widgets of a paid Gradio page (see `payment_fields`)."""

    token: Any       # gr.Textbox: the escrow's spend token (a password field)
    balance: Any     # gr.Textbox: what the escrow can still spend, read-only

    @property
    def inputs(self) -> list:
        """The input to list after a gated handler's own (``@paid(..., fields=True)``)."""
        return [self.token]

    def show(self, receipt: dict | None) -> str:
        """The balance text for a receipt (`GateReceipt.to_dict`)."""
        return f"{receipt['remaining_usdc']} USDC" if receipt and "remaining_usdc" in receipt else ""


def payment_fields(gate: Gate, *, price: str, trial_amount: Any = None, trial_per_client: int = 3,
                   trial_overall: int = 100, trial_window_s: float = 3600) -> PaymentFields:
    """A spend token field, the price, the remaining balance and a "Check balance" button.

    Call it inside ``gr.Blocks``. With `trial_amount` (embedded ledger only; the Space's
    owner turns it on) a "Get a test escrow" button fills the token of a fresh escrow of
    that many USDC, at most `trial_per_client` times per client (IP) and `trial_overall`
    times in all per `trial_window_s`: a private event is still callable by a script. The
    buttons' events are private: they are not part of the Space's API.

    Example:
        >>> with gr.Blocks() as demo:
        ...     pay = payment_fields(gate, price="0.001 USDC per answer")
        ...     button.click(answer, [message, *pay.inputs], [output, receipt])
    """
    gr = gradio_module()
    if gr is None:
        raise ValidationError("payment_fields needs gradio (pip install gradio)")

    def check(token: str) -> str:
        try:
            return f"{gate.balance(token)} USDC"
        except EscrowError as error:
            raise gr.Error(error.message, title="Escrow", print_exception=False) from None

    from ...limits import WindowLimiter, client_key
    trials = WindowLimiter("test escrows", per_client=trial_per_client, overall=trial_overall,
                           window_s=trial_window_s)

    def trial(request: gr.Request) -> tuple[str, str]:
        try:
            trials.take(client_key(getattr(getattr(request, "client", None), "host", None)))
            _, token = trial_escrow(gate.seller_id, trial_amount)
        except EscrowError as error:
            raise gr.Error(error.message, title="Test escrow", print_exception=False) from None
        return token, f"{to_usdc(parse_usdc(trial_amount))} USDC"

    with gr.Row():
        token = gr.Textbox(label="Spend token", type="password", placeholder="est_...", scale=3,
                           info=f"the escrow's spend token (sent by code as the {TOKEN_HEADER} header); "
                                "never your API key")
        gr.Textbox(label="Price", value=price, interactive=False, scale=1)
        balance = gr.Textbox(label="Remaining balance", value="", interactive=False, scale=1)
    with gr.Row():
        check_button = gr.Button("Check balance", size="sm")
        check_button.click(check, token, balance, api_visibility="private")
        if trial_amount is not None:
            trial_button = gr.Button("Get a test escrow (embedded ledger)", size="sm")
            trial_button.click(trial, None, [token, balance], api_visibility="private")
    return PaymentFields(token, balance)


def trial_escrow(seller: str, amount: Any, *, ttl_seconds: float = 3600) -> tuple[str, str]:
    """On an embedded ledger only: a new test buyer, funded from the faucet, with an escrow for `seller`.

    Returns ``(escrow_id, spend_token)``. For local demos of a paid Space (the "try it"
    button); against a real escrow server, buyers open their own escrows.

    Example:
        >>> escrow_id, token = trial_escrow("paid-chat", "0.02")
    """
    from ...client import connect
    if os.environ.get("HF_ESCROW_URL"):
        raise Forbidden("trial escrows exist on the embedded ledger only; open an escrow on the escrow server")
    name = "visitor-" + uuid.uuid4().hex[:10]
    buyer = connect(agent=name)
    buyer.register(name)
    buyer.claim_faucet()
    escrow = buyer.create_escrow(seller, amount, ttl_seconds=ttl_seconds, description="trial escrow (demo)")
    return escrow.id, escrow.spend_token
