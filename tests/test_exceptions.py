"""Errors rebuilt from what a server answered: every class comes back as itself."""

import pytest

import hf_escrow
from hf_escrow._exceptions import _BY_CODE, EscrowError, InsufficientFunds, NotFound, ValidationError, error_for_status


@pytest.mark.parametrize("cls", sorted(_BY_CODE.values(), key=lambda c: c.code), ids=lambda c: c.__name__)
def test_every_error_round_trips_through_its_body(cls):
    sent = cls("the message", details={"escrow_id": "esc_1"})
    back = error_for_status(sent.status_code, sent.to_dict(), response="r")
    assert type(back) is cls
    assert (back.message, back.details, back.response) == ("the message", {"escrow_id": "esc_1"}, "r")


def test_every_public_error_has_a_code_the_client_maps_back():
    public = {getattr(hf_escrow, name) for name in hf_escrow.__all__}
    errors = {obj for obj in public if isinstance(obj, type) and issubclass(obj, EscrowError) and obj is not EscrowError}
    assert errors <= set(_BY_CODE.values()), errors - set(_BY_CODE.values())


def test_openai_shaped_error_body_is_read():
    body = {"error": {"message": "model not found", "type": "invalid_request_error", "code": "not_found"}}
    error = error_for_status(404, body)
    assert type(error) is NotFound and error.message == "model not found"


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (402, "plain text", InsufficientFunds),
        (422, ["a", "list"], ValidationError),
        (404, {"error": {"code": ["unhashable"]}}, NotFound),
        (422, {"error": 7, "message": 8}, ValidationError),
        (500, None, EscrowError),
    ],
)
def test_odd_bodies_fall_back_to_the_status(status, body, expected):
    error = error_for_status(status, body)
    assert type(error) is expected
    assert error.message.startswith(f"server answered HTTP {status}")
