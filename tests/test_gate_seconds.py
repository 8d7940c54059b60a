"""`gate.paid(per="second")`: a hold for max_seconds x price, the handler's own run time captured.

A real Gradio app called 40 times at once with `gradio_client` (so calls wait in Gradio's
queue) checks that each charge is the handler's measured seconds x price and that queue
time is never billed; then plain callables for streams, errors, refusals, price sheets
per GPU-second, and ZeroGPU's ``@spaces.GPU`` (absent here, and a stand-in of its
signature that waits for a "GPU" before running the task).
"""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import time
import types
from decimal import Decimal

import pytest

from hf_escrow import InsufficientFunds, InvalidAmount, StateConflict, ValidationError
from hf_escrow.gate import _spaces_gpu
from hf_escrow.money import to_usdc
from hf_escrow.pricing import Pricing

from .helpers import assert_audit_clean
from .liveserver import free_port
from .test_gate import World

RATE = Decimal("0.01")                                  # USDC per second: 10 micro-USDC a millisecond
TOLERANCE_MICRO = max(1, int(RATE * 1_000_000 * Decimal("0.002")))   # max(1 micro, price x 2 ms)


@pytest.fixture
def world(sqlite_url) -> World:
    return World(sqlite_url)


def expected_micro(elapsed_ns: int, rate: Decimal = RATE) -> Decimal:
    return Decimal(elapsed_ns) * rate * 1_000_000 / 1_000_000_000


def assert_charged_for(receipt: dict, elapsed_ns: int, rate: Decimal = RATE) -> None:
    charged_micro = Decimal(receipt["charged_usdc"]) * 1_000_000
    assert abs(charged_micro - expected_micro(elapsed_ns, rate)) <= TOLERANCE_MICRO, (receipt, elapsed_ns)
    assert abs(Decimal(receipt["seconds"]) * 1_000_000_000 - elapsed_ns) < 2_000_000, (receipt, elapsed_ns)
    assert receipt["billing"] == "second" and Decimal(receipt["rate_usdc_per_s"]) == rate


# ---- in a real Gradio app --------------------------------------------------------------


@pytest.fixture
def timed_app(world):
    """A Blocks app whose handler sleeps a random 50-500 ms and records its own run time."""
    import gradio as gr
    measured: dict[str, int] = {}
    began: dict[str, float] = {}

    @world.gate.paid(price=RATE, per="second", max_seconds=2, with_receipt=True)
    def work(tag: str) -> str:
        began[tag] = time.perf_counter()
        started = time.perf_counter_ns()
        if tag == "boom":
            time.sleep(0.1)
            raise RuntimeError("model crashed")
        time.sleep(random.uniform(0.05, 0.5))
        measured[tag] = time.perf_counter_ns() - started
        return tag

    with gr.Blocks() as demo:
        box, out, receipt = gr.Textbox(), gr.Textbox(), gr.JSON()
        gr.Button().click(work, box, [out, receipt], api_name="work", concurrency_limit=8)
    port = free_port()
    demo.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}", measured, began
    finally:
        demo.close()


def test_40_gradio_calls_each_pay_their_own_run_time_and_never_the_queue(world, timed_app):
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    url, measured, began = timed_app
    e = world.escrow("1")
    client = Client(url, headers=world.pay(e), verbose=False, max_workers=40)
    submitted = time.perf_counter()
    jobs = {f"call-{i}": client.submit(f"call-{i}", api_name="/work") for i in range(40)}
    receipts = {}
    for tag, job in jobs.items():
        answer, receipt = job.result(timeout=120)
        assert answer == tag
        receipts[tag] = receipt
    for tag, receipt in receipts.items():
        assert_charged_for(receipt, measured[tag])
    # 40 calls through 8 slots: many waited in Gradio's queue longer than they ran, and paid for running only
    queued = [tag for tag in receipts if (began[tag] - submitted) * 1e9 > measured[tag]]
    assert len(queued) >= 10
    total_micro = sum(int(Decimal(r["charged_usdc"]) * 1_000_000) for r in receipts.values())
    after = world.buyer.get(e.id)
    assert after.paid == to_usdc(total_micro) and after.held == 0
    assert after.remaining == after.amount - after.paid

    with pytest.raises(AppError, match="not charged"):          # a handler that raises costs nothing
        client.predict("boom", api_name="/work")
    assert world.buyer.get(e.id).paid == after.paid and world.buyer.get(e.id).held == 0
    assert_audit_clean(world.ledger)


# ---- plain callables -------------------------------------------------------------------


def test_a_call_holds_max_seconds_at_the_rate_and_frees_what_it_did_not_run(world):
    seen = {}

    @world.gate.paid(price=RATE, per="second", max_seconds=3, with_receipt=True)
    def work(seconds):
        started = time.perf_counter_ns()
        seen["hold"] = world.buyer.holds(e.id)
        time.sleep(seconds)
        seen["ns"] = time.perf_counter_ns() - started
        return "done"

    e = world.escrow("0.05")
    _, receipt = work(0.12, request=world.pay(e))
    assert [h.amount for h in seen["hold"]] == [Decimal("0.03")]            # 3 s x 0.01 USDC/s, held first
    assert_charged_for(receipt, seen["ns"])
    assert receipt["units"] == 1 and world.gate.receipts[-1].seconds == Decimal(receipt["seconds"])
    after = world.buyer.get(e.id)
    assert after.held == 0 and after.paid == Decimal(receipt["charged_usdc"])

    small = world.escrow("0.02")                          # less than the worst case: refused, never run
    seen.clear()
    with pytest.raises(InsufficientFunds, match=r"up to 3 s at 0.01 USDC/s\) may cost up to 0.030000 USDC"):
        work(0.01, request=world.pay(small))
    assert seen == {} and world.buyer.get(small.id).paid == 0
    assert_audit_clean(world.ledger)


def test_a_raising_handler_costs_nothing(world):
    @world.gate.paid(price=RATE, per="second", max_seconds=1)
    def work():
        time.sleep(0.05)
        raise ValueError("crashed")

    @world.gate.paid(price=RATE, per="second", max_seconds=1)
    async def work_async():
        await asyncio.sleep(0.05)
        raise ValueError("crashed")

    e = world.escrow("0.05")
    with pytest.raises(ValueError):
        work(request=world.pay(e))
    with pytest.raises(ValueError):
        asyncio.run(work_async(request=world.pay(e)))
    after = world.buyer.get(e.id)
    assert after.paid == 0 and after.held == 0 and after.remaining == after.amount
    assert_audit_clean(world.ledger)


def test_a_stream_is_timed_per_step_captured_as_it_flows_and_cut_at_max_seconds(world):
    steps: list[int] = []
    captured_mid: list[Decimal] = []

    @world.gate.paid(price=RATE, per="second", max_seconds=1, capture_every=2, with_receipt=True)
    def stream(n, fail_at=None):
        for i in range(n):
            started = time.perf_counter_ns()
            time.sleep(0.06)
            if i == fail_at:
                raise RuntimeError("broke mid-stream")
            steps.append(time.perf_counter_ns() - started)
            yield i

    e = world.escrow("0.5")
    outputs = []
    for item in stream(5, request=world.pay(e)):
        outputs.append(item)
        if len(outputs) == 3:
            captured_mid.append(world.buyer.get(e.id).paid)  # two steps were captured already
            time.sleep(0.3)                                  # the consumer's time is not the handler's
    final = outputs[-1][1]
    assert [o[0] for o in outputs[:-1]] == list(range(5)) and final["units"] == 5
    assert_charged_for(final, sum(steps))
    assert 0 < captured_mid[0] < Decimal(final["charged_usdc"])

    steps.clear()                                            # an error pays the delivered steps only
    with pytest.raises(RuntimeError):
        list(stream(5, fail_at=2, request=world.pay(e)))
    assert len(steps) == 2
    paid_before = Decimal(final["charged_usdc"])
    error_paid = world.buyer.get(e.id).paid - paid_before
    assert abs(error_paid * 1_000_000 - expected_micro(sum(steps))) <= TOLERANCE_MICRO

    steps.clear()                                            # 1 s of 60 ms steps: cut after the 17th
    long = list(stream(100, request=world.pay(e)))
    assert len(long) - 1 == len(steps) == 17 and Decimal(long[-1][1]["charged_usdc"]) == Decimal("0.01")
    assert world.buyer.get(e.id).held == 0
    assert_audit_clean(world.ledger)


def test_a_cancel_mid_stream_pays_the_steps_run_and_stops_the_stream(world):
    steps: list[int] = []

    @world.gate.paid(price=RATE, per="second", max_seconds=5, capture_every=1)
    def stream(n):
        for i in range(n):
            started = time.perf_counter_ns()
            time.sleep(0.03)
            steps.append(time.perf_counter_ns() - started)
            yield i

    e = world.escrow("0.1")
    seen = []
    with pytest.raises(StateConflict, match="was closed"):
        for item in stream(50, request=world.pay(e)):
            seen.append(item)
            if len(seen) == 3:
                world.buyer.cancel(e.id)          # the buyer walks away mid-stream
    after = world.buyer.get(e.id)
    # cut at the next capture: the steps that ran were delivered, and each is paid
    assert len(seen) == len(steps) == 4 and after.held == 0 and after.status == "cancelled"
    assert abs(after.paid * 1_000_000 - expected_micro(sum(steps))) <= TOLERANCE_MICRO
    assert after.refunded == after.amount - after.paid
    assert_audit_clean(world.ledger)


def test_async_handlers_are_timed_too(world):
    @world.gate.paid(price=RATE, per="second", max_seconds=1, with_receipt=True)
    async def work():
        await asyncio.sleep(0.08)
        return "ok"

    @world.gate.paid(price=RATE, per="second", max_seconds=1, with_receipt=True)
    async def stream():
        for i in range(3):
            await asyncio.sleep(0.03)
            yield i

    async def both(token):
        answer = await work(request=token)
        items = [item async for item in stream(request=token)]
        return answer, items

    e = world.escrow("0.1")
    (answer, receipt), items = asyncio.run(both(world.pay(e)))
    assert answer == "ok" and 0.08 <= float(receipt["seconds"]) < 0.2
    assert items[-1][1]["units"] == 3 and 0.09 <= float(items[-1][1]["seconds"]) < 0.25
    assert world.buyer.get(e.id).held == 0
    assert_audit_clean(world.ledger)


def test_a_price_sheet_per_gpu_second_multiplies_by_the_hardware_gpus(world):
    sheet = Pricing(per_gpu_second="0.005", hardware="a10g-largex2")        # 2 GPUs: 0.01 USDC a second
    assert sheet.second_rate == RATE and Pricing(per_second="0.01").second_rate == RATE
    measured = {}

    @world.gate.paid(price=sheet, per="second", max_seconds=1, with_receipt=True)
    def work():
        started = time.perf_counter_ns()
        time.sleep(0.1)
        measured["ns"] = time.perf_counter_ns() - started
        return 1

    @world.gate.paid(price={"per_second": "0.01"}, per="second", max_seconds=1, with_receipt=True)
    def work_dict():
        return 2

    e = world.escrow("0.1")
    assert_charged_for(work(request=world.pay(e))[1], measured["ns"])
    assert work_dict(request=world.pay(e))[1]["rate_usdc_per_s"] == "0.01"
    assert_audit_clean(world.ledger)


@pytest.mark.parametrize("options, error, message", [
    (dict(price=RATE, per="second"), ValidationError, "needs max_seconds"),
    (dict(price=RATE, per="call", max_seconds=1), ValidationError, 'for per="second"'),
    (dict(price=RATE, per="second", max_seconds=0), ValidationError, "more than 0"),
    (dict(price=RATE, per="second", max_seconds=10_000), ValidationError, "at most 870"),
    (dict(price="-1", per="second", max_seconds=1), InvalidAmount, "must not be negative"),
    (dict(price="0", per="second", max_seconds=1), ValidationError, "more than 0"),
    (dict(price=Pricing(per_second="0.01"), per="call"), ValidationError, 'use it with per="second"'),
    (dict(price=Pricing(per_call="0.01"), per="second", max_seconds=1), ValidationError, "no time prices"),
    (dict(price="0.0000001", per="second", max_seconds=1), ValidationError, "rounds to 0"),
])
def test_bad_declarations_are_refused(world, options, error, message):
    with pytest.raises(error, match=message):
        gated = world.gate.paid(**options)(lambda: None)
        gated(request=world.pay(world.escrow("0.01")))           # a worst case of 0 is refused at the call
    assert all(world.buyer.holds(escrow.id) == [] for escrow in world.buyer.history())


@pytest.mark.parametrize("bad", [dict(per_gpu_second="0.01"), dict(per_second="0.01", hardware="t4-small"),
                                 dict(per_gpu_second="0.01", hardware="cpu-basic"),
                                 dict(per_gpu_second="0.01", hardware="")])
def test_bad_gpu_price_sheets_are_refused(bad):
    with pytest.raises(ValidationError):
        Pricing(**bad)


# ---- ZeroGPU's @spaces.GPU ---------------------------------------------------------------


GPU_WAIT_S = 0.25


def stand_in_spaces(calls: list) -> types.ModuleType:
    """A `spaces` module with ZeroGPU's ``GPU(task=None, *, duration=None, size=None)`` signature.

    Like ZeroGPU, it waits for a GPU before the task runs and runs it elsewhere (a worker
    thread here), so only what the task returns comes back.
    """
    module = types.ModuleType("spaces")

    def GPU(task=None, *, duration=None, size=None):
        if task is None:
            return lambda fn: GPU(fn, duration=duration, size=size)
        calls.append(duration)
        import inspect
        if inspect.isgeneratorfunction(task):
            def streamed(*args, **kwargs):
                time.sleep(GPU_WAIT_S)
                yield from task(*args, **kwargs)
            return streamed

        def run(*args, **kwargs):
            time.sleep(GPU_WAIT_S)
            box = {}
            worker = threading.Thread(target=lambda: box.update(out=task(*args, **kwargs)))
            worker.start()
            worker.join(30)
            return box["out"]
        return run

    module.GPU = GPU
    return module


def test_gpu_true_without_spaces_runs_the_handler_as_it_is(world):
    assert _spaces_gpu() is None          # not installed (the repo's spaces/ folder is no ZeroGPU package)

    @world.gate.paid(price=RATE, per="second", gpu=True, with_receipt=True)
    def work():
        time.sleep(0.05)
        return "ok"

    e = world.escrow("1")
    seen = {}
    original = world.seller.hold

    def spy(*args, **kwargs):
        seen["amount"] = args[1]
        return original(*args, **kwargs)
    world.seller.hold = spy
    answer, receipt = work(request=world.pay(e))
    assert answer == "ok" and seen["amount"] == Decimal("0.6")        # ZeroGPU's default 60 s, held
    assert 0.05 <= float(receipt["seconds"]) < 0.1
    assert_audit_clean(world.ledger)


def test_under_a_spaces_gpu_stand_in_the_gpu_wait_is_not_billed(world, monkeypatch):
    durations: list = []
    monkeypatch.setitem(sys.modules, "spaces", stand_in_spaces(durations))
    measured = {}

    @world.gate.paid(price=RATE, per="second", max_seconds=4.5, gpu=True, with_receipt=True)
    def work():
        started = time.perf_counter_ns()
        time.sleep(0.1)
        measured["ns"] = time.perf_counter_ns() - started
        return "ok"

    @world.gate.paid(price=RATE, per="second", max_seconds=2, gpu=True, with_receipt=True)
    def stream():
        for i in range(3):
            time.sleep(0.04)
            yield i

    assert durations == [5, 2]                           # whole seconds, max_seconds rounded up
    e = world.escrow("1")
    before = time.perf_counter_ns()
    answer, receipt = work(request=world.pay(e))
    assert time.perf_counter_ns() - before >= GPU_WAIT_S * 1e9 + measured["ns"]
    assert answer == "ok"
    assert_charged_for(receipt, measured["ns"])
    *_, (last, final) = stream(request=world.pay(e))
    assert last == 2 and 0.12 <= float(final["seconds"]) < 0.2        # the 0.25 s GPU wait is not in it
    assert world.buyer.get(e.id).held == 0
    assert_audit_clean(world.ledger)


def test_a_per_second_refusal_advertises_the_rate_and_one_call_s_hold_as_the_smallest_escrow(world):
    @world.gate.paid(price=RATE, per="second", max_seconds=3)
    def work():
        return "ran"

    offer = world.gate.offer("work")
    assert (dict(offer.pricing), offer.min_escrow_micro) == ({"per_second": "0.01"}, 30_000)   # 3 s x 0.01 USDC/s

    @world.gate.paid(price=Pricing(per_gpu_second="0.0005", hardware="a10g-largex2"), per="second", max_seconds=2)
    def on_gpus():
        return "ran"

    sheet = world.gate.offer("on_gpus")
    assert sheet.pricing["per_gpu_second"] == "0.0005" and sheet.min_escrow_micro == 2_000   # 2 s x 2 GPUs
