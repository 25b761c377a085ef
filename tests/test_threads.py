"""Threads sharing one model: each sees only its own scoped hooks, caches and generations, and
gets bit for bit what it gets alone; persistent hooks added while another thread runs apply from
that thread's next forward (its next step, in a generation), never half-way through one."""

from __future__ import annotations

import sys
import threading

import pytest
import torch
from model_factory import random_model

from hookedcot import ModelConfig
from hookedcot.hook_points import _SCOPED

CFG = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=96)
N_THREADS, N_CALLS = 8, 100


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, seed=3)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Python threads here, not torch's: its intra-op pool only contends on a shared 2-core machine
    (a thread's 100 calls take 4.3 s with 2 torch threads, 0.17 s with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tokens(thread: int) -> torch.Tensor:
    return torch.randint(0, CFG.d_vocab, (2, 5 + thread % 3), generator=torch.Generator().manual_seed(100 + thread))


def _thread_hooks(thread: int):
    """Each thread edits its own point by its own amount, and counts its own calls."""
    name = f"blocks.{thread % CFG.n_layers}.hook_resid_mid"
    factor = 1.0 + 0.1 * (thread + 1)
    calls = []

    def scale(x, hook):
        calls.append(hook.name)
        return x * factor

    return [(name, scale)], calls


def _calls(model, thread: int) -> list:
    """Thread `thread`'s 100 calls: hooked forwards, run_with_cache, hook blocks and generations;
    returns what each produced (and checks each call saw only its own hooks)."""
    tokens = _tokens(thread)
    out = []
    with torch.no_grad():
        for i in range(N_CALLS):
            hooks, calls = _thread_hooks(thread)
            kind = (thread + i) % 4
            if kind == 0:
                out.append(model.run_with_hooks(tokens, fwd_hooks=hooks))
            elif kind == 1:
                logits, cache = model.run_with_cache(tokens, fwd_hooks=hooks, names_filter=lambda n: "resid" in n)
                out.append((logits, dict(cache.items())))
            elif kind == 2:
                with model.hooks(fwd_hooks=hooks):
                    assert model.active_hook_names() == [hooks[0][0]]
                    out.append(model(tokens))
            else:
                out.append(model.generate(tokens, max_new_tokens=3, stop_at_eos=False, fwd_hooks=hooks))
            assert calls == [hooks[0][0]] * (3 if kind == 3 else 1), f"thread {thread} call {i}: {calls}"
            assert _SCOPED.get() == ()
    return out


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, tuple):
        return all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    raise TypeError(type(a))


@pytest.fixture
def fast_switching():
    """Switch threads every 0.1 ms instead of every 5 ms, so interleavings are many."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    yield
    sys.setswitchinterval(interval)


def test_eight_threads_of_a_hundred_calls_each_equal_their_single_threaded_runs(model, fast_switching):
    alone = [_calls(model, t) for t in range(N_THREADS)]
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(N_THREADS)

    def worker(t: int) -> None:
        try:
            start.wait()
            results[t] = _calls(model, t)
        except BaseException as e:  # reported below, with the thread's number
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]
    for t in range(N_THREADS):
        assert len(results[t]) == N_CALLS
        different = [i for i, (a, b) in enumerate(zip(results[t], alone[t])) if not _equal(a, b)]
        assert not different, f"thread {t}: calls {different[:10]} differ from the single-threaded run"
    # the threads' hooks really changed their results: otherwise the test could not see a leak
    with torch.no_grad():
        clean = model(_tokens(0))
    assert not torch.equal(alone[0][0], clean)


def test_a_persistent_hook_added_mid_forward_applies_from_the_next_forward(model):
    tokens = _tokens(0)
    with torch.no_grad():
        clean = model(tokens)
        model.add_hook("blocks.1.hook_mlp_out", lambda x, h: x * 0)
        zeroed = model(tokens)
        model.reset_hooks()
    assert not torch.equal(clean, zeroed)
    inside, added = threading.Event(), threading.Event()
    got = {}

    def pause(x, hook):  # hold the other thread inside its forward, before blocks.1
        inside.set()
        assert added.wait(timeout=60)

    def other():
        with torch.no_grad():
            got["during"] = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", pause)])
            got["after"] = model(tokens)

    th = threading.Thread(target=other)
    th.start()
    try:
        assert inside.wait(timeout=60)
        model.add_hook("blocks.1.hook_mlp_out", lambda x, h: x * 0)
        added.set()
        th.join(timeout=120)
    finally:
        added.set()
        model.reset_hooks()
    assert torch.equal(got["during"], clean)  # the running forward kept the hooks it started with
    assert torch.equal(got["after"], zeroed)  # its next forward has the new one


def test_a_persistent_hook_added_mid_generation_applies_from_the_next_step(model):
    tokens = _tokens(1)
    stepped, added = threading.Event(), threading.Event()
    seen_positions: list[int] = []

    def on_token(step, next_tokens):
        if step == 1:
            stepped.set()
            assert added.wait(timeout=60)

    def record(x, hook):
        seen_positions.extend(hook.positions.tolist())

    # a Python hook keeps the generation on the eager loop, which builds each step's hooks afresh
    # (a fast-path generation, hookedcot.fast_decode, keeps the interventions it started with)
    watch = [("blocks.0.hook_resid_pre", lambda x, h: None)]
    th = threading.Thread(target=lambda: model.generate(tokens, max_new_tokens=4, stop_at_eos=False, on_token=on_token,
                                                        fwd_hooks=watch))
    th.start()
    try:
        assert stepped.wait(timeout=60)
        model.add_hook("hook_embed", record)
        added.set()
        th.join(timeout=120)
    finally:
        added.set()
        model.reset_hooks()
    p = tokens.shape[1]
    # prompt + 4 tokens: the prompt forward and steps 0, 1 ran before the add; the forwards of the
    # tokens chosen at steps 1 and 2 (positions p+1, p+2) ran after it
    assert seen_positions == [p + 1, p + 2]


def test_reset_hooks_in_one_thread_leaves_another_threads_scoped_hooks(model):
    tokens = _tokens(2)
    hooks, calls = _thread_hooks(2)
    ready, reset = threading.Event(), threading.Event()

    def other():
        ready.wait(timeout=60)
        model.reset_hooks()
        reset.set()

    th = threading.Thread(target=other)
    th.start()
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        ready.set()
        assert reset.wait(timeout=60)
        model(tokens)
    th.join()
    assert calls == [hooks[0][0]]


def test_persistent_hooks_added_from_many_threads_at_once_all_land(model, fast_switching):
    per_thread = 50
    start = threading.Barrier(N_THREADS)

    def adder(t: int) -> None:
        start.wait()
        for i in range(per_thread):
            model.add_hook(f"blocks.{i % CFG.n_layers}.hook_resid_pre", lambda x, h: None)

    threads = [threading.Thread(target=adder, args=(t,)) for t in range(N_THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert sum(len(fns) for fns in model._persistent.values()) == N_THREADS * per_thread
    finally:
        model.reset_hooks()
    assert model._persistent == {}
