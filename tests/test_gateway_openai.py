"""The gateway's refusals as OpenAI clients read them, and as hf-escrow's own clients do."""

from __future__ import annotations

import httpx
import openai
import pytest

from hf_escrow import challenge
from hf_escrow._exceptions import PaymentRequired, StateConflict, error_for_status
from hf_escrow.seller.gateway import create_gateway
from tests.helpers import buyer_and_seller
from tests.liveserver import free_port, serve_app

PRICES = {"input_per_1k": "0.001", "output_per_1k": "0.002"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.fixture
def gateway(tmp_path):
    """A gateway in front of a model server that is not there: every request here is refused before it."""
    buyer, seller = buyer_and_seller(f"sqlite:///{tmp_path / 'ledger.db'}")
    app = create_gateway(f"http://127.0.0.1:{free_port()}/v1", escrow=seller, pricing=PRICES)
    with serve_app(app) as url:
        yield url, buyer


def test_the_openai_sdk_reads_the_message_type_and_reason_of_a_402(gateway):
    url, _ = gateway
    client = openai.OpenAI(base_url=url + "/v1", api_key="not-a-key", max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(**CHAT)
    error = refused.value
    assert error.status_code == 402 and error.type == "payment_required" and error.code == challenge.NO_TOKEN
    assert "send the escrow's spend token" in error.body["message"] and error.body["message"] in error.message
    found = challenge.from_response(402, error.response.headers, None)     # the header alone carries the facts
    assert found is not None and found.reason == challenge.NO_TOKEN and found.seller == "seller"


def test_a_refused_stream_reaches_the_openai_sdk_as_an_error_with_its_message(gateway):
    url, buyer = gateway
    escrow = buyer.create_escrow("seller", "0.5")
    buyer.cancel(escrow.id)
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0,
                           default_headers={challenge.TOKEN_HEADER: escrow.spend_token})
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(**CHAT, stream=True)
    assert refused.value.status_code == 402 and refused.value.code == challenge.ESCROW_CLOSED
    assert refused.value.type == "state_conflict"


def test_hf_escrows_own_readers_still_read_the_gateways_402(gateway):
    url, buyer = gateway
    nothing = httpx.post(url + "/v1/chat/completions", json=CHAT)
    body = nothing.json()
    assert set(body["error"]) >= {"message", "type", "code", "param"}
    assert type(error_for_status(402, body)) is PaymentRequired             # not InsufficientFunds
    found = challenge.from_response(402, nothing.headers, nothing.content)
    assert found is not None and found.reason == challenge.NO_TOKEN and found.min_escrow_micro > 0
    escrow = buyer.create_escrow("seller", "0.5")
    buyer.cancel(escrow.id)
    closed = httpx.post(url + "/v1/chat/completions", json=CHAT, headers={challenge.TOKEN_HEADER: escrow.spend_token})
    error = error_for_status(closed.status_code, closed.json())
    assert type(error) is StateConflict and escrow.id in error.message
    assert challenge.from_response(402, closed.headers, closed.content).reason == challenge.ESCROW_CLOSED
