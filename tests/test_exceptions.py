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


# ---- one tree, mapped both ways over real HTTP ---------------------------------------

import hf_escrow._exceptions as exceptions_module  # noqa: E402

PUBLIC = [getattr(exceptions_module, name) for name in exceptions_module.__all__
          if isinstance(getattr(exceptions_module, name), type)]


def test_every_public_error_is_in_the_one_tree_with_its_own_code():
    assert {cls.__name__ for cls in PUBLIC} >= {"JobError", "ArtifactError", "ArtifactMismatch", "ModelServerError",
                                                 "PaymentRequired"}
    assert all(issubclass(cls, EscrowError) for cls in PUBLIC)
    errors = [cls for cls in PUBLIC if cls is not EscrowError]
    assert len({cls.code for cls in errors}) == len(errors)
    assert set(errors) == set(_BY_CODE.values())
    assert all(f" {cls.__name__} " in exceptions_module.__doc__ for cls in PUBLIC), "draw it in the docstring"


def test_the_finetune_and_local_model_errors_are_the_same_classes():
    from hf_escrow import finetune, localmodel
    assert (finetune.JobError, finetune.ArtifactError, finetune.ArtifactMismatch, localmodel.ModelServerError) == (
        exceptions_module.JobError, exceptions_module.ArtifactError, exceptions_module.ArtifactMismatch,
        exceptions_module.ModelServerError)
    assert issubclass(localmodel.ModelServerError, RuntimeError)   # what callers caught before


@pytest.fixture(scope="module")
def raising_server():
    """A real server on 127.0.0.1 whose routes raise each error, rendered by the escrow server's handlers."""
    from fastapi import FastAPI

    from hf_escrow.server.app import _install_error_handlers
    from tests.liveserver import serve_app

    app = FastAPI()
    _install_error_handlers(app)

    @app.get("/raise/{code}")
    def raise_it(code: str):
        raise _BY_CODE[code]("the message", details={"escrow_id": "esc_1"})

    with serve_app(app) as url:
        yield url


@pytest.mark.parametrize("cls", [c for c in PUBLIC if c is not EscrowError], ids=lambda c: c.__name__)
def test_every_error_raised_in_a_server_comes_back_as_itself(raising_server, cls):
    import httpx

    answer = httpx.get(f"{raising_server}/raise/{cls.code}")
    back = error_for_status(answer.status_code, answer.json(), response=answer)
    assert answer.status_code == cls.status_code and type(back) is cls
    assert (back.message, back.details, back.response) == ("the message", {"escrow_id": "esc_1"}, answer)


def test_a_remote_payment_required_is_not_insufficient_funds(raising_server):
    import httpx

    answer = httpx.get(f"{raising_server}/raise/payment_required")
    assert answer.status_code == 402 and type(error_for_status(402, answer.json())) is exceptions_module.PaymentRequired


@pytest.mark.parametrize("cls", [c for c in PUBLIC if c is not EscrowError], ids=lambda c: c.__name__)
def test_every_error_in_the_gateways_openai_shape_comes_back_as_itself(cls):
    from hf_escrow.seller.gateway import _error_body

    body = _error_body(cls.code, "the message", {"escrow_id": "esc_1"})
    assert set(body) == {"error"} and set(body["error"]) >= {"message", "type", "code", "param"}
    back = error_for_status(cls.status_code, body)
    assert type(back) is cls and (back.message, back.details) == ("the message", {"escrow_id": "esc_1"})


def test_an_artifact_mismatch_keeps_its_verdict_and_rebuilds_without_one():
    sent = exceptions_module.ArtifactMismatch("bad sha256", "the verdict")
    assert sent.verdict == "the verdict" and sent.to_dict() == {"error": "artifact_mismatch", "message": "bad sha256"}
    back = error_for_status(422, sent.to_dict())
    assert type(back) is exceptions_module.ArtifactMismatch and back.verdict is None
