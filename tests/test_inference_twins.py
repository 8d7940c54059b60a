"""`PaidInferenceClient` and `AsyncPaidInferenceClient` are twins: the same public names, the same
signatures (the async one awaited), the same errors for the same bad input, and the same bill for
the same work against real local servers (`transformers serve` for chat, a TGI server over the
same tiny model for text_generation). A drift between the two fails here."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import hf_escrow
from hf_escrow import (AsyncPaidInferenceClient, EscrowError, InsufficientFunds, NotFound, PaidInferenceClient, Pricing,
                       StateConflict, ValidationError)
from hf_escrow.buyer.inference import PAID_METHODS, PER_CALL_TASKS
from hf_escrow.ledger import Ledger
from hf_escrow.tokens import PER_MESSAGE_OVERHEAD_TOKENS

from .helpers import assert_audit_clean
from .liveserver import free_port, serve_app
from .models import tgi_app

PRICES = {"input_per_1k": "0.0005", "output_per_1k": "0.0015"}
MSGS = [{"role": "user", "content": "hello world, say hi in french"}]
PROMPT = "the escrow pays the seller"


def _public(cls: type) -> list[str]:
    return sorted(name for name in dir(cls) if not name.startswith("_"))


def test_the_twins_have_the_same_public_names():
    assert _public(PaidInferenceClient) == _public(AsyncPaidInferenceClient)
    assert set(PAID_METHODS) | set(PER_CALL_TASKS) <= set(_public(PaidInferenceClient))


def test_every_method_has_the_same_signature_and_the_async_one_is_awaited():
    compared = 0
    for name in ["__init__"] + _public(PaidInferenceClient):
        sync, twin = inspect.getattr_static(PaidInferenceClient, name), inspect.getattr_static(
            AsyncPaidInferenceClient, name)
        if isinstance(sync, property):
            assert isinstance(twin, property), name
            continue
        sync, twin = getattr(PaidInferenceClient, name), getattr(AsyncPaidInferenceClient, name)
        if not callable(sync):
            assert sync == twin, name
            continue
        ours, theirs = inspect.signature(sync), inspect.signature(twin)
        assert ours.parameters == theirs.parameters, name
        if name == "__init__":
            continue
        assert not inspect.iscoroutinefunction(sync) and inspect.iscoroutinefunction(twin), name
        # `X` in the sync client is a coroutine of `X` in the async one (a stream is an async iterable).
        assert str(theirs.return_annotation) == str(ours.return_annotation).replace("Iterable", "AsyncIterable"), name
        compared += 1
    assert compared >= len(PAID_METHODS) + len(PER_CALL_TASKS)


@pytest.fixture
def ledger_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    ledger = Ledger(url)
    ledger.register("seller")
    ledger.register("buyer")
    ledger.deposit("buyer", "5")
    yield ledger, url
    assert_audit_clean(ledger)


NOWHERE = f"http://127.0.0.1:{free_port()}/v1"   # nothing listens: a call that reaches the model fails
BAD_INPUTS = [
    # (constructor arguments over the defaults, the call made, what it should raise)
    (dict(pricing=None), ("chat_completion", (MSGS,), {}), ValidationError),
    (dict(seller=None), ("chat_completion", (MSGS,), {}), ValidationError),
    (dict(budget="999"), ("chat_completion", (MSGS,), {}), InsufficientFunds),
    (dict(budget="-1"), ("chat_completion", (MSGS,), {}), ValidationError),
    (dict(seller=None, escrow_id="esc_nope"), ("finish", (), {}), NotFound),
    (dict(), ("chat_completion", (MSGS,), dict(max_tokens=10_000_000)), InsufficientFunds),
    (dict(), ("text_generation", (PROMPT,), dict(max_new_tokens=10_000_000)), InsufficientFunds),
    (dict(), ("feature_extraction", ("a text",), {}), ValidationError),   # no per_vector price: not for sale
    (dict(), ("audio_classification", (b"RIFF",), {}), ValidationError),  # no per_call price
    (dict(), ("chat_completion", (MSGS,), dict(max_tokens=4)), Exception),   # the model is unreachable
    (dict(), ("text_generation", (PROMPT,), dict(max_new_tokens=4)), Exception),
    (dict(), ("chat_completion", (MSGS,), dict(no_such_argument=1)), Exception),
]


def _said(error: BaseException, client) -> tuple[type, str | None]:
    """The error's class, and its message when it is ours (httpx words a refused connection its own way
    in its sync and async transports)."""
    if not isinstance(error, EscrowError):
        return type(error), None
    escrow_id = getattr(client, "_meter", None) and client.escrow_id
    return type(error), str(error).replace(escrow_id, "<escrow>") if escrow_id else str(error)


@pytest.mark.parametrize("overrides,call,expected", BAD_INPUTS,
                         ids=[f"{c[0]}-{'+'.join(o) or 'call'}" for o, c, _ in BAD_INPUTS])
def test_the_same_bad_input_raises_the_same_error_and_costs_nothing(ledger_url, overrides, call, expected):
    ledger, url = ledger_url
    name, args, kwargs = call
    before = ledger.me("buyer")["balance_micro"]

    def made(cls, escrow):
        return cls(NOWHERE, **{**dict(escrow=escrow, pricing=PRICES, seller="seller", budget="0.05"), **overrides})

    sync_client = None
    with pytest.raises(expected) as sync_error:
        sync_client = made(PaidInferenceClient, hf_escrow.connect(agent="buyer", database_url=url))
        getattr(sync_client, name)(*args, **kwargs)

    async def twin():
        client = None
        with pytest.raises(expected) as error:
            client = made(AsyncPaidInferenceClient, hf_escrow.connect_async(agent="buyer", database_url=url))
            await getattr(client, name)(*args, **kwargs)
        return client, error.value

    async_client, async_error = asyncio.run(twin())
    assert _said(sync_error.value, sync_client) == _said(async_error, async_client)
    for client in (sync_client, async_client):
        if client is not None and client._meter is not None:
            assert client.receipts == [] and ledger.get("buyer", client.escrow_id)["held_micro"] == 0
            asyncio.run(client.finish()) if client is async_client else client.finish()
    assert ledger.me("buyer")["balance_micro"] == before   # refused and failed calls cost nothing


def test_the_async_constructor_does_no_io_and_concurrent_first_calls_open_one_escrow(ledger_url):
    ledger, url = ledger_url
    client = AsyncPaidInferenceClient(NOWHERE, escrow=hf_escrow.connect_async(agent="buyer", database_url=url),
                                      pricing={**PRICES}, seller="seller", budget="0.05")
    with pytest.raises(StateConflict):
        client.escrow_id   # noqa: B018 - the escrow opens with the first call
    assert ledger.me("buyer")["escrows_open"] == 0

    async def first_calls():
        refused = [client.chat_completion(MSGS, max_tokens=10_000_000) for _ in range(4)]
        return await asyncio.gather(*refused, return_exceptions=True)

    assert all(isinstance(r, InsufficientFunds) for r in asyncio.run(first_calls()))
    assert ledger.me("buyer")["escrows_open"] == 1
    asyncio.run(client.finish())
    assert ledger.get("buyer", client.escrow_id)["status"] == "released"


# ---- the same work, billed the same by both twins, against real servers ------------------------

@pytest.fixture(scope="module")
def tgi_url(tiny_dir):
    with serve_app(tgi_app(tiny_dir)) as url:
        yield url


def _work_sync(tiny_url, tgi_url, buyer):
    with hf_escrow.paid_inference(tgi_url, escrow=buyer, seller="seller", budget="0.1", pricing=PRICES) as text:
        said = [text.text_generation(PROMPT, max_new_tokens=5),
                list(text.text_generation(PROMPT, max_new_tokens=4, stream=True)),
                text.text_generation(PROMPT, max_new_tokens=3, details=True).generated_text]
    with hf_escrow.paid_inference(tiny_url, escrow=buyer, seller="seller", budget="0.1", pricing=PRICES) as chat:
        usage = [chat.chat_completion(MSGS, max_tokens=5).usage,
                 list(chat.chat_completion(MSGS, max_tokens=6, stream=True))[-1].usage]
    return said, usage, text, chat


async def _work_async(tiny_url, tgi_url, buyer):
    async with hf_escrow.paid_inference(tgi_url, escrow=buyer, seller="seller", budget="0.1",
                                        pricing=PRICES) as text:
        said = [await text.text_generation(PROMPT, max_new_tokens=5),
                [t async for t in await text.text_generation(PROMPT, max_new_tokens=4, stream=True)],
                (await text.text_generation(PROMPT, max_new_tokens=3, details=True)).generated_text]
    async with hf_escrow.paid_inference(tiny_url, escrow=buyer, seller="seller", budget="0.1",
                                        pricing=PRICES) as chat:
        usage = [(await chat.chat_completion(MSGS, max_tokens=5)).usage,
                 [c async for c in await chat.chat_completion(MSGS, max_tokens=6, stream=True)][-1].usage]
    return said, usage, text, chat


def test_both_twins_bill_text_generation_and_chat_completion_the_same(tiny_url, tgi_url, ledger_url):
    ledger, url = ledger_url
    sheet = Pricing.coerce(PRICES)
    prompt_tokens = len(PROMPT.encode()) + PER_MESSAGE_OVERHEAD_TOKENS   # no tokenizer: the safe upper bound
    sync = _work_sync(tiny_url, tgi_url, hf_escrow.connect(agent="buyer", database_url=url))
    twin = asyncio.run(_work_async(tiny_url, tgi_url, hf_escrow.connect_async(agent="buyer", database_url=url)))

    assert sync[0] == twin[0]                       # greedy: the same text, streamed or not
    assert len(sync[0][1]) == 4 and "".join(sync[0][1]) == sync[0][0][:len("".join(sync[0][1]))]
    for said, usage, text, chat in (sync, twin):
        assert [(r.tokens_in, r.tokens_out, r.counted_by) for r in text.receipts] == \
            [(prompt_tokens, 5, "usage"), (prompt_tokens, 4, "chunks"), (prompt_tokens, 3, "usage")]
        assert [r.tokens_out for r in chat.receipts] == [5, 6]
        text_escrow, chat_escrow = ledger.get("buyer", text.escrow_id), ledger.get("buyer", chat.escrow_id)
        assert text_escrow["paid_micro"] == sum(sheet.tokens_micro(prompt_tokens, n) for n in (5, 4, 3))
        assert chat_escrow["paid_micro"] == sum(sheet.tokens_micro(u.prompt_tokens, u.completion_tokens)
                                                for u in usage)
        assert text_escrow["status"] == chat_escrow["status"] == "released"
        assert text_escrow["held_micro"] == chat_escrow["held_micro"] == 0


def _picky_tgi():
    """A TGI server that, like a real one, refuses a generation parameter its model does not take
    with the 400 huggingface_hub answers by calling `text_generation` again without it."""
    app = FastAPI()
    app.state.calls = 0

    @app.post("/")
    async def generate(request: Request):
        app.state.calls += 1
        parameters = (await request.json())["parameters"]
        if parameters.get("watermark"):
            return JSONResponse({"error": "The following `model_kwargs` are not used by the model: ['watermark']",
                                 "error_type": "validation"}, status_code=400)
        tokens = [{"id": i, "text": t, "logprob": 0.0, "special": False} for i, t in enumerate(["a", "b", "c"])]
        return JSONResponse([{"generated_text": "abc", "details": {"finish_reason": "length", "generated_tokens": 3,
                                                                   "seed": None, "prefill": [], "tokens": tokens}}])
    return app


def test_a_text_generation_retried_by_huggingface_hub_is_billed_once(ledger_url):
    """huggingface_hub re-enters `self.text_generation` after some 400s; the paid client's re-entry
    must reach the model, not open a second bill for the same work."""
    ledger, url = ledger_url
    app = _picky_tgi()
    sheet = Pricing.coerce(PRICES)
    prompt_tokens = len(PROMPT.encode()) + PER_MESSAGE_OVERHEAD_TOKENS
    with serve_app(app) as tgi:
        async def twin():
            async with hf_escrow.paid_inference(tgi, escrow=hf_escrow.connect_async(agent="buyer", database_url=url),
                                                seller="seller", budget="0.1", pricing=PRICES) as client:
                return await client.text_generation(PROMPT, max_new_tokens=3, watermark=True), client
        with hf_escrow.paid_inference(tgi, escrow=hf_escrow.connect(agent="buyer", database_url=url),
                                      seller="seller", budget="0.1", pricing=PRICES) as client:
            results = [(client.text_generation(PROMPT, max_new_tokens=3, watermark=True), client)]
        results.append(asyncio.run(twin()))
    assert app.state.calls >= 3                      # the 400 happened, and the retry reached the server
    for text, client in results:
        assert text == "abc"
        assert [(r.tokens_in, r.tokens_out) for r in client.receipts] == [(prompt_tokens, 3)]
        assert ledger.get("buyer", client.escrow_id)["paid_micro"] == sheet.tokens_micro(prompt_tokens, 3)
