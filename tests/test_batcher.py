"""Continuous batching (microbatch.batcher) and fair admission (microbatch.admission), with fake models and the tiny
model: rows of concurrent sampler loops share UNet calls and come back unchanged, out-of-memory halving loses no
row, a stopped participant leaves at its next submission, and admission is first come, first served."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from microbatch.admission import FairAdmission
from microbatch.batcher import ContinuousBatcher
from microbatch.engine import Engine, ImageJob, Interrupted, SamplingSettings

CPU = torch.device("cpu")


class FakeModel:
    """apply_model whose row i depends only on row i's inputs; records the rows of every call. `oom_above`: a
    call of more rows raises an out-of-memory RuntimeError (as torch does on a GPU)."""

    def __init__(self, oom_above=None, delay=0.0):
        self.calls: list[int] = []
        self.oom_above = oom_above
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, x, t, cond):
        if self.oom_above is not None and x.shape[0] > self.oom_above:
            raise RuntimeError(f"CUDA out of memory. Tried to allocate {x.shape[0]} rows")
        with self.lock:
            self.calls.append(int(x.shape[0]))
        time.sleep(self.delay)
        context = cond["c_crossattn"][0] if isinstance(cond, dict) else cond
        return x * (1 + t[:, None, None, None] / 1000) + context.mean(dim=(1, 2))[:, None, None, None]


def reference(x, t, cond):
    return FakeModel()(x, t, cond)


def loop(batcher, owner, rows, steps, seed, out, stop=None, context_len=77, start=None):
    """A fake sampler loop: `steps` submissions of `rows` rows, each feeding on the previous output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 4, 2, 2, generator=g)
    cond = torch.randn(rows, context_len, 8, generator=g)
    expected = x.clone()
    if start is not None:
        start.wait()
    try:
        with batcher.participant(owner, stop) as p:
            for k in range(steps):
                t = torch.full((rows,), float(999 - 37 * k - seed))
                expected = reference(expected, t, cond)
                x = p.apply_model(x, t, cond)
        out[owner] = (x, expected)
    except Interrupted:
        out[owner] = "interrupted"


def run_threads(targets):
    threads = [threading.Thread(target=f) for f in targets]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
        assert not th.is_alive(), "a participant hung"


def test_concurrent_loops_share_calls_and_get_their_own_rows_back():
    model = FakeModel()
    batcher = ContinuousBatcher(model, max_rows=64)
    out: dict = {}
    start = threading.Barrier(4)
    # Different row counts and step counts (they leave at different times), one with longer contexts.
    specs = [("a", 2, 5, 77), ("b", 3, 9, 77), ("c", 1, 3, 77), ("d", 2, 6, 154)]
    run_threads([lambda s=s: loop(batcher, s[0], s[1], s[2], seed=i, out=out, context_len=s[3], start=start) for i, s in enumerate(specs)])
    for name, *_ in specs:
        got, expected = out[name]
        assert torch.equal(got, expected), name
    stats = batcher.stats
    assert stats.rows == sum(rows * steps for _, rows, steps, _ in specs)
    assert stats.shared_calls >= 3 and stats.max_rows_per_call >= 5
    # Longer contexts never share a call with 77-token ones: at most 6 rows (a + b + c) per call.
    assert max(model.calls) <= 6


def test_a_participant_joins_at_a_step_boundary():
    model = FakeModel(delay=0.01)
    batcher = ContinuousBatcher(model)
    out: dict = {}

    def late():
        end = time.monotonic() + 10
        while len(model.calls) < 2 and time.monotonic() < end:  # the early loop is running alone
            time.sleep(0.001)
        loop(batcher, "late", 2, 3, seed=5, out=out)

    def early():
        loop(batcher, "early", 2, 30, seed=6, out=out)

    run_threads([early, late])
    for name in ("early", "late"):
        assert torch.equal(*out[name])
    assert model.calls[:2] == [2, 2] and 4 in model.calls and batcher.stats.shared_calls >= 1


def test_out_of_memory_halves_the_call_and_loses_no_row(caplog):
    model = FakeModel(oom_above=3)
    batcher = ContinuousBatcher(model, max_rows=16)
    out: dict = {}
    start = threading.Barrier(3)
    run_threads([lambda i=i: loop(batcher, f"p{i}", 2, 4, seed=i, out=out, start=start) for i in range(3)])
    for i in range(3):
        assert torch.equal(*out[f"p{i}"])
    assert max(model.calls) <= 3 and sum(model.calls) == 3 * 2 * 4
    assert batcher.stats.oom_halvings >= 1
    assert "out of memory in a UNet call" in caplog.text
    # The smaller size is kept: later rounds of the same shapes do not run out of memory again.
    halvings = batcher.stats.oom_halvings
    start = threading.Barrier(3)
    run_threads([lambda i=i: loop(batcher, f"q{i}", 2, 2, seed=i, out=out, start=start) for i in range(3)])
    assert batcher.stats.oom_halvings == halvings


def test_other_errors_reach_the_participants_of_that_call():
    def model(x, t, cond):
        if cond.shape[1] == 154:
            raise ValueError("bad context")
        return reference(x, t, cond)

    batcher = ContinuousBatcher(model)
    errors: dict = {}
    out: dict = {}
    start = threading.Barrier(2)

    def failing():
        try:
            loop(batcher, "bad", 1, 3, seed=1, out=out, context_len=154, start=start)
        except ValueError as e:
            errors["bad"] = str(e)

    run_threads([failing, lambda: loop(batcher, "good", 1, 3, seed=2, out=out, start=start)])
    assert errors == {"bad": "bad context"} and torch.equal(*out["good"])


def test_a_stopped_participant_leaves_at_its_next_submission():
    batcher = ContinuousBatcher(FakeModel(delay=0.005))
    out: dict = {}
    calls = {"n": 0}

    def stop_after_two():
        calls["n"] += 1
        return calls["n"] > 2

    start = threading.Barrier(2)
    run_threads([
        lambda: loop(batcher, "gone", 1, 50, seed=1, out=out, stop=stop_after_two, start=start),
        lambda: loop(batcher, "stays", 1, 8, seed=2, out=out, start=start),
    ])
    assert out["gone"] == "interrupted" and torch.equal(*out["stays"])
    assert batcher.stats.dropped == 1 and batcher.active == 0


@pytest.mark.parametrize("sampler", ["euler_a", "dpmpp_2m", "heun", "ddim"])
def test_engines_sharing_a_batcher_give_the_images_they_give_alone(tiny_model, sampler):
    """Two engines in threads, different samplers, step counts, guidance scales and prompts: bit-equal latents."""
    batcher = ContinuousBatcher(tiny_model.apply_model, max_rows=8)
    settings = [
        SamplingSettings(sampler=sampler, steps=4, guidance_scale=3.0, height=32, width=32, max_batch_size=2),
        SamplingSettings(sampler="euler", steps=6, guidance_scale=7.0, height=32, width=32, max_batch_size=1, eta=0.0),
    ]
    jobs = [[ImageJob(0, "a red circle", 11), ImageJob(1, "a blue square", 12)], [ImageJob(0, "a house", 13, "blurry")]]
    alone = [Engine(tiny_model, CPU).sample_batch(j, s) for j, s in zip(jobs, settings)]
    shared: dict = {}
    start = threading.Barrier(2)

    def run(i):
        engine = Engine(tiny_model, CPU, shared_unet=lambda: batcher.participant(i))
        start.wait()
        shared[i] = engine.sample_batch(jobs[i], settings[i])

    run_threads([lambda i=i: run(i) for i in range(2)])
    for i in range(2):
        assert torch.equal(shared[i], alone[i])
    assert batcher.stats.shared_calls >= 1


# -- admission ------------------------------------------------------------------------------------------------------


def test_admission_is_first_come_first_served_and_switches_keys_when_drained():
    admission = FairAdmission(poll_s=0.01)
    switches: list = []

    def prepare(key, capacity=4):
        return lambda: switches.append(key) or capacity

    a, b, c, d = (admission.ticket() for _ in range(4))
    grant_a = a.acquire("32", 3, prepare("32"))
    assert grant_a.images == 3 and switches == ["32"]
    order: list = []

    def take(ticket, key, want, name):
        with ticket, ticket.acquire(key, want, prepare(key)) as grant:
            order.append((name, grant.images))
            time.sleep(0.02)

    threads = [threading.Thread(target=take, args=args) for args in ((b, "48", 1, "b"), (c, "32", 1, "c"), (d, "32", 8, "d"))]
    for th in threads:
        th.start()
        time.sleep(0.05)  # b, c and d arrive in this order
    assert order == [] and admission.waiting == 3  # c fits beside a, but does not pass b (another size)
    grant_a.release()
    time.sleep(0.05)
    assert order == []  # a still running: b waits for it to finish, not only for its slots
    a.close()
    for th in threads:
        th.join(10)
    assert order == [("b", 1), ("c", 1), ("d", 4)]  # d's 8 capped at the capacity of 4
    assert switches == ["32", "48", "32"]


def test_an_earlier_request_comes_back_ahead_of_a_waiting_one_and_nothing_deadlocks():
    """a and b run together; a's next micro-batch has another key (another LoRA set): it switches once b's slots
    are free, ahead of b's next micro-batch (b came later), and then b switches back."""
    admission = FairAdmission(poll_s=0.01)
    a, b = admission.ticket(), admission.ticket()
    order: list = []
    ga = a.acquire("k1", 1, lambda: 4)
    gb = b.acquire("k1", 1, lambda: 4)

    def a_next():
        ga.release()
        with a.acquire("k2", 1, lambda: 4):
            order.append("a-k2")
        a.close()

    def b_next():
        time.sleep(0.05)
        gb.release()
        with b.acquire("k1", 1, lambda: 4):
            order.append("b-k1")
        b.close()

    run_threads([a_next, b_next])
    assert order == ["a-k2", "b-k1"]


def test_a_waiting_request_that_stops_leaves_the_queue():
    admission = FairAdmission(poll_s=0.01)
    a, b = admission.ticket(), admission.ticket()
    grant = a.acquire("k", 1, lambda: 1)
    stop = threading.Event()
    result: dict = {}

    def waiter():
        try:
            b.acquire("k", 1, lambda: 1, stop.is_set)
        except Interrupted:
            result["b"] = "interrupted"

    th = threading.Thread(target=waiter)
    th.start()
    time.sleep(0.05)
    stop.set()
    th.join(5)
    assert result == {"b": "interrupted"} and admission.waiting == 0
    grant.release()
