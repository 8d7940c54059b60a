"""The embedded model: conversion is atomic and cached, the server starts, answers, and reports usage.

The `model` tests convert the real GGUF once (about a minute) into `$HF_ESCROW_TEST_MODEL_HOME`,
by default `~/.cache/hf-escrow-test/models`, so later runs start in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError

from hf_escrow import localmodel
from hf_escrow.localmodel import (
    ModelServerError, free_port, model_home, prepare_model, wait_healthy,
)

MESSAGES = [{"role": "user", "content": "Write a short story about a robot."}]


# --- fast: no model -------------------------------------------------------------------------------

def test_model_home_follows_hf_escrow_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ESCROW_HOME", str(tmp_path))
    assert model_home() == tmp_path / "models"
    monkeypatch.delenv("HF_ESCROW_HOME")
    assert model_home() == Path.home() / ".cache" / "hf-escrow" / "models"


def _fake_convert(packaged, gguf_dir, out, report):
    out.mkdir()
    (out / "config.json").write_text("{}")


def test_a_half_written_folder_is_replaced_and_no_temp_folder_is_left(monkeypatch, tmp_path):
    half = tmp_path / localmodel.MODEL_FOLDER
    half.mkdir()
    (half / "stale.bin").write_text("interrupted conversion")
    monkeypatch.setattr(localmodel, "_convert", _fake_convert)

    folder = prepare_model(home=tmp_path)

    assert folder == half
    assert sorted(p.name for p in folder.iterdir()) == [".hf-escrow-complete", "config.json"]
    assert [p.name for p in tmp_path.iterdir()] == [localmodel.MODEL_FOLDER]


def test_a_finished_folder_is_returned_without_converting(monkeypatch, tmp_path):
    monkeypatch.setattr(localmodel, "_convert", _fake_convert)
    folder = prepare_model(home=tmp_path)
    monkeypatch.setattr(localmodel, "_convert", lambda *args: pytest.fail("converted twice"))
    assert prepare_model(home=tmp_path) == folder


def test_a_failed_conversion_leaves_nothing_behind(monkeypatch, tmp_path):
    def broken(packaged, gguf_dir, out, report):
        out.mkdir()
        raise OSError("disk full")
    monkeypatch.setattr(localmodel, "_convert", broken)
    with pytest.raises(OSError, match="disk full"):
        prepare_model(home=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_wait_healthy_reports_a_dead_server_at_once():
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait()
    started = time.monotonic()
    with pytest.raises(ModelServerError, match="exited with code 3"):
        wait_healthy(f"http://127.0.0.1:{free_port()}/v1", 30, process=process)
    assert time.monotonic() - started < 5


def test_wait_healthy_gives_up_when_time_runs_out():
    started = time.monotonic()
    with pytest.raises(ModelServerError, match="not healthy after 1.0 s"):
        wait_healthy(f"http://127.0.0.1:{free_port()}/v1", 1.0, interval_s=0.2)
    assert time.monotonic() - started < 4


# --- slow: the real model -------------------------------------------------------------------------

@pytest.mark.model
def test_prepared_folder_is_plain_bf16_with_a_gemma_chat_template(gemma_dir: Path):
    from transformers import AutoTokenizer

    started = time.monotonic()
    assert prepare_model(home=gemma_dir.parent) == gemma_dir
    assert time.monotonic() - started < 1, "a finished folder must be returned without converting"

    config = json.loads((gemma_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    assert json.loads((gemma_dir / "generation_config.json").read_text())["eos_token_id"] == [1, 106]
    prompt = AutoTokenizer.from_pretrained(gemma_dir).apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.model
def test_chat_completion_reports_usage(gemma_url: str, gemma_dir: Path):
    max_tokens = 12
    reply = InferenceClient(base_url=gemma_url).chat_completion(MESSAGES, model=str(gemma_dir), max_tokens=max_tokens)

    assert reply.model == str(gemma_dir)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content.strip()
    usage = reply.usage
    assert usage.prompt_tokens > 0
    assert 1 <= usage.completion_tokens <= max_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert choice.finish_reason in ("stop", "length")
    if choice.finish_reason == "length":
        assert usage.completion_tokens == max_tokens


@pytest.mark.model
def test_streamed_chat_completion_carries_usage_in_the_last_chunk(gemma_url: str, gemma_dir: Path):
    from transformers import AutoTokenizer

    max_tokens = 16
    # The stream lives in the client's exit stack: a client dropped before the stream is read closes it.
    with InferenceClient(base_url=gemma_url) as client:
        chunks = list(client.chat_completion(MESSAGES, model=str(gemma_dir), max_tokens=max_tokens, stream=True))

    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(chunk.usage is None for chunk in chunks[:-1])
    last = chunks[-1]
    usage = last.usage
    assert usage.prompt_tokens > 0
    assert 1 <= usage.completion_tokens <= max_tokens
    assert last.choices[0].finish_reason in ("stop", "length")
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])

    pieces = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices[0].delta.content]
    text = "".join(pieces)
    assert text.strip()
    # A chunk holds at least one token (a character split across tokens waits for the rest).
    assert 1 <= len(pieces) <= usage.completion_tokens
    if last.choices[0].finish_reason == "length":
        # A stream cut off before its usage chunk is billed by re-counting its text: that count must agree.
        tokenizer = AutoTokenizer.from_pretrained(gemma_dir)
        assert len(tokenizer(text, add_special_tokens=False).input_ids) == usage.completion_tokens


@pytest.mark.model
def test_the_server_refuses_any_other_model_name(gemma_url: str):
    with pytest.raises(HfHubHTTPError, match="Bad request"):
        InferenceClient(base_url=gemma_url).chat_completion(MESSAGES, model="google/gemma-3-270m", max_tokens=4)


@pytest.mark.model
def test_the_demo_prompt_gets_a_sensible_answer_from_the_base_model(gemma_url: str, gemma_dir: Path):
    """The packaged model is not instruction-tuned: the demo shows it a pattern, greedy."""
    from hf_escrow.demo import CHAT_MAX_TOKENS, CHAT_SENTENCE, chat_messages, first_sentence
    assert CHAT_SENTENCE == "The capital of France is"
    with InferenceClient(base_url=gemma_url) as client:  # the stream reads through the client's connection
        stream = client.chat_completion(chat_messages(), model=str(gemma_dir), max_tokens=CHAT_MAX_TOKENS,
                                        stream=True, temperature=0)
        answer = "".join(first_sentence(stream))
    assert "Paris" in answer, answer


def test_the_demo_shows_the_answer_to_the_end_of_its_first_sentence():
    from types import SimpleNamespace

    from hf_escrow.demo import first_sentence

    def chunks(*pieces):
        return iter([SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content=p))]) for p in pieces]
                    + [SimpleNamespace(choices=[])])
    assert "".join(first_sentence(chunks("\n", " Paris", ".", "łęoperation"))) == "Paris."
    assert "".join(first_sentence(chunks("Par", "is", "\nmore"))) == "Paris"
    assert "".join(first_sentence(chunks())) == ""
