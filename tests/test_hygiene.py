"""Hook hygiene, proven by a seeded random walk over the ways a call can go wrong.

Each run installs a random set of persistent hooks, then does one random thing — a hooked forward,
`run_with_cache`, a `with model.hooks(...)` block, a forward extending a KV cache, `generate`, a
partly consumed `generate_stream`, a patching sweep — with a random failure planted in it: a hook
that raises (RuntimeError, KeyboardInterrupt) on its k-th call, a hook returning the wrong shape or
NaN under `check_finite`, a raising `on_token` or sweep metric, an out-of-vocabulary token, an
exception in the body of a hook block, a stream dropped half-way. Afterwards:

- no scoped hook is attached and only the run's persistent hooks are active;
- every tensor a hook saw or a cache held is freed, with the garbage collector off (so no
  reference cycle is needed to free it);
- the shared KV cache still holds exactly its prefix and extends to the reference logits;
- the next call's logits equal the reference for those persistent hooks bit for bit (references
  computed before any run, from a fresh model).

1,000 runs in the normal suite, 10,000 marked slow (`pytest -m slow tests/test_hygiene.py`).
"""

from __future__ import annotations

import gc
import random
import traceback
import weakref
from itertools import combinations

import pytest
import torch
from model_factory import random_model

from hookedcot import HookError, ModelConfig
from hookedcot.hook_points import _SCOPED, NonFiniteError
from hookedcot.inputs import InputError
from hookedcot.interp import patch_layer_position
from hookedcot.kv_cache import KVCache

CFG = ModelConfig(n_layers=2, d_model=16, n_heads=2, n_key_value_heads=1, d_head=8, d_mlp=32, d_vocab=64)
CI_RUNS, SLOW_RUNS = 1_000, 10_000
PREFIX = 4  # positions the shared KV cache holds
NEW_TOKENS = 3
SWEEP_BATCH = 4

TOKENS = torch.randint(0, CFG.d_vocab, (2, 6), generator=torch.Generator().manual_seed(16))
CORRUPT = TOKENS[:1].clone()
CORRUPT[0, 1] = (CORRUPT[0, 1] + 1) % CFG.d_vocab


def _half(x, hook):
    return x * 0.5


def _shift(x, hook):
    return x + 0.25


def _look(x, hook):
    return None


# Persistent hooks a run may install (the pattern hook moves attention onto the explicit path).
PERSISTENT = (("blocks.0.hook_mlp_out", _half), ("blocks.1.attn.hook_z", _shift), ("blocks.1.attn.hook_pattern", _look))
SUBSETS = [c for r in range(len(PERSISTENT) + 1) for c in combinations(range(len(PERSISTENT)), r)]


class Boom(RuntimeError):
    pass


class Bomb:
    """A hook (or callback, or metric) that behaves until its `after`-th call, then fails as `kind`."""

    def __init__(self, kind: str, after: int):
        self.kind, self.after, self.calls, self.fired = kind, after, 0, False

    def __call__(self, x=None, hook=None):
        self.calls += 1
        if self.calls < self.after:
            return None if hook is not None else (x.float().mean(-1) if isinstance(x, torch.Tensor) else None)
        self.fired = True
        if self.kind == "raise":
            raise Boom("planted")
        if self.kind == "interrupt":
            raise KeyboardInterrupt
        if self.kind == "shape":
            return x.reshape(-1)  # a different shape whatever the hook's
        if self.kind == "nan":
            return x * float("nan")
        raise AssertionError(self.kind)

    def expected(self) -> type[BaseException]:
        return {"raise": Boom, "interrupt": KeyboardInterrupt, "shape": HookError, "nan": NonFiniteError}[self.kind]


class World:
    """The model, its references (computed before any run) and the shared KV cache."""

    def __init__(self):
        self.model = random_model(CFG, seed=16)
        self.names = self.model.hook_names()
        with torch.no_grad():  # hooks that switch the computation to another path (same math, other bits):
            clean = self.model(TOKENS)  # the explicit attention path, per-head results, split inputs
            self.path_changing = {n for n in self.names
                                  if not torch.equal(self.model.run_with_hooks(TOKENS, fwd_hooks=[(n, _look)]), clean)}
        self.logits, self.suffix, self.generated, self.sweep = {}, {}, {}, {}
        self.kv = KVCache(CFG, 2, 6, self.model.dtype, "cpu")
        with torch.no_grad():
            self.model(TOKENS[:, :PREFIX], past_kv=self.kv)
        for subset in SUBSETS:
            self.install(subset, permanent=False)
            with torch.no_grad():
                self.logits[subset] = self.model(TOKENS)
                self.suffix[subset] = self.model(TOKENS[:, PREFIX:], past_kv=self.kv)
                self.kv.truncate(PREFIX)
            self.generated[subset] = self.model.generate(TOKENS, max_new_tokens=NEW_TOKENS, stop_at_eos=False)
            self.sweep[subset] = patch_layer_position(self.model, TOKENS[:1], CORRUPT, metric=_metric, progress=False,
                                                      batch_size=SWEEP_BATCH).values
            self.model.reset_hooks(including_permanent=True)

    def install(self, subset, permanent: bool) -> None:
        for i in subset:
            name, fn = PERSISTENT[i]
            if permanent:
                self.model.hook_dict[name].add_perma_hook(fn)
            else:
                self.model.add_hook(name, fn)


def _metric(logits):
    return logits[:, -1].float().logsumexp(-1)


OPS = ("forward", "cache", "block", "kv", "generate", "stream", "sweep")
FAILURES = ("none", "raise", "interrupt", "shape", "nan")


def one_run(world: World, seed: int) -> str:
    """One seeded run; returns a label of what it did (for the coverage count)."""
    rng = random.Random(seed)
    model = world.model
    subset = rng.choice(SUBSETS)
    permanent = rng.random() < 0.3
    world.install(subset, permanent)
    op = rng.choice(OPS)
    extra = {"forward": ("input",), "block": ("input", "body"), "cache": ("input", "body")}.get(op, ())
    failure = rng.choice(FAILURES + extra)
    seen: list[weakref.ref] = []
    names_seen: list[str] = []

    def watch(x, hook):
        seen.append(weakref.ref(x))
        names_seen.append(hook.name)

    def scoped_hooks():
        hooks = [(rng.choice(world.names), watch)]
        if rng.random() < 0.5:
            hooks.append((rng.choice(world.names), _half))
        return hooks

    # a bomb on every hook point goes off at a random point inside a forward; on one point, in
    # one of the forwards of a generation or sweep
    everywhere = rng.random() < 0.5
    bomb = None
    if failure in ("raise", "interrupt", "shape", "nan"):
        bomb = Bomb(failure, rng.randint(1, 60) if everywhere else rng.randint(1, 3))
    callback = failure in ("raise", "interrupt") and rng.random() < 0.4
    if callback and op in ("generate", "stream"):
        bomb_at = "on_token"
    elif callback and op == "sweep":
        bomb_at = "metric"
    else:
        bomb_at = "hook"
    if bomb is not None and bomb_at == "hook":
        hooks = scoped_hooks() + [((lambda name: True) if everywhere else rng.choice(world.names), bomb)]
    else:
        hooks = scoped_hooks()
    rng.shuffle(hooks)
    grad = rng.random() < 0.3
    model.check_finite = failure == "nan" or rng.random() < 0.1
    error: BaseException | None = None
    # what the run must end in when no bomb fires (None: success)
    expected = {"input": InputError, "body": Boom}.get(failure)
    try:
        with torch.set_grad_enabled(grad):
            _act(world, rng, op, failure, bomb, bomb_at, hooks, seen)
    except BaseException as e:  # noqa: B036 - KeyboardInterrupt is one of the planted failures
        error = e
    finally:
        model.check_finite = False
    fired = bomb is not None and bomb.fired
    if fired:
        expected = bomb.expected()
    if expected is None:
        assert error is None, f"run {seed} ({op}, {failure}): unexpected {''.join(traceback.format_exception(error))}"
    else:
        assert isinstance(error, expected), f"run {seed} ({op}, {failure}): expected {expected.__name__}, got {error!r}"
    del error

    assert _SCOPED.get() == (), f"run {seed}: scoped hooks left attached"
    assert sorted(model.active_hook_names()) == sorted({PERSISTENT[i][0] for i in subset}), f"run {seed}"
    alive = [r() for r in seen if r() is not None]
    assert not alive, (f"run {seed} ({op}, {failure}): {len(alive)} of {len(seen)} tensors seen by hooks "
                       f"({names_seen}) are still alive, held by {_holders(alive[0])}")
    assert world.kv.length == PREFIX, f"run {seed}: the shared KV cache moved to {world.kv.length}"
    with torch.no_grad():
        assert torch.equal(model(TOKENS), world.logits[subset]), f"run {seed} ({op}, {failure}): logits differ"
        if rng.random() < 0.25:
            assert torch.equal(model(TOKENS[:, PREFIX:], past_kv=world.kv), world.suffix[subset]), f"run {seed}"
            world.kv.truncate(PREFIX)
    model.reset_hooks(including_permanent=permanent)
    assert model._persistent == {}, f"run {seed}: persistent hooks survived reset_hooks"
    return f"{op}/{failure}/{'fired' if fired else 'quiet'}"


def _act(world: World, rng: random.Random, op: str, failure: str, bomb, bomb_at: str, hooks, seen) -> None:
    """Run `op` with its planted failure. A successful run whose hooks only watch must give the
    reference result."""
    model = world.model
    tokens = TOKENS.clone()
    if failure == "input":
        tokens[rng.randrange(2), rng.randrange(6)] = CFG.d_vocab + rng.randrange(5)
    # hooks that only watch, at points that do not switch the computation to another path (the
    # explicit attention path for scores/pattern, the per-head sum for result): reference results
    plain = _plain(world, hooks)

    if op == "forward":
        out = model.run_with_hooks(tokens, fwd_hooks=hooks)
        assert not plain or torch.equal(out, world.logits[_subset_of(world)])
    elif op == "cache":
        names = None if rng.random() < 0.5 else rng.sample(world.names, 5)
        out, cache = model.run_with_cache(tokens, names_filter=names, fwd_hooks=hooks,
                                          remove_batch_dim=False, pos_slice=rng.choice([None, -1, (1, 4)]))
        seen.extend(weakref.ref(t) for t in cache.values())
        if failure == "body":
            raise Boom("after the call")
    elif op == "block":
        with model.hooks(fwd_hooks=hooks):
            for i in range(rng.randint(1, 3)):
                model(tokens)
                if failure == "body" and i == 0:
                    raise Boom("in the block's body")
    elif op == "kv":
        out = model.run_with_hooks(tokens[:, PREFIX:], past_kv=world.kv, fwd_hooks=hooks)
        world.kv.truncate(PREFIX)
    elif op == "generate":
        on_token = (lambda step, t: bomb(t)) if bomb_at == "on_token" else None
        out = model.generate(tokens, max_new_tokens=NEW_TOKENS, stop_at_eos=False, fwd_hooks=hooks, on_token=on_token,
                             use_cache=rng.random() < 0.8)
        assert not plain or torch.equal(out, world.generated[_subset_of(world)])
    elif op == "stream":
        on_token = (lambda step, t: bomb(t)) if bomb_at == "on_token" else None
        stream = model.generate_stream(tokens, max_new_tokens=NEW_TOKENS, max_tokens_per_yield=1, stop_at_eos=False,
                                       fwd_hooks=hooks, on_token=on_token)
        for _ in range(rng.randint(0, NEW_TOKENS + 1)):
            if next(stream, None) is None:
                break
        if rng.random() < 0.5:
            stream.close()
        del stream
    elif op == "sweep":
        metric = _metric
        if bomb_at == "metric":
            def metric(logits):
                bomb(logits)
                return _metric(logits)
        around = hooks if rng.random() < 0.5 else []
        with model.hooks(fwd_hooks=around):
            values = patch_layer_position(model, TOKENS[:1], CORRUPT, metric=metric, progress=False,
                                          batch_size=SWEEP_BATCH).values
        if _plain(world, around) and not any(fn is bomb for _, fn in around):
            assert torch.equal(values, world.sweep[_subset_of(world)])


def _subset_of(world: World) -> tuple[int, ...]:
    active = set(world.model.active_hook_names())
    return tuple(i for i, (name, _) in enumerate(PERSISTENT) if name in active)


def _plain(world: World, hooks) -> bool:
    return not any(fn is _half or not isinstance(name, str) or name in world.path_changing for name, fn in hooks)


def _holders(x) -> list[str]:
    """What refers to a leaked tensor (for the failure message)."""
    return [type(r).__name__ + (f" {list(r)[:8]}" if isinstance(r, dict) else "") for r in gc.get_referrers(x)
            if r is not gc.garbage]


def _walk(n_runs: int, seed: int) -> dict[str, int]:
    world = World()
    done: dict[str, int] = {}
    gc.collect()
    gc.disable()  # every tensor must be freed by reference counting alone: no cycle holds one
    try:
        for i in range(n_runs):
            label = one_run(world, seed * 1_000_003 + i)
            done[label] = done.get(label, 0) + 1
    finally:
        gc.enable()
    return done


def _coverage(done: dict[str, int]) -> None:
    ops = {label.split("/")[0] for label in done}
    failures = {label.split("/")[1] for label in done}
    assert ops == set(OPS) and failures == set(FAILURES) | {"input", "body"}
    fired = sum(n for label, n in done.items() if label.endswith("fired"))
    assert fired > 0.3 * sum(done.values())  # the planted failures do go off


@pytest.fixture(autouse=True)
def one_thread():
    """Hundreds of tiny forwards: extra threads only contend on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_thousand_seeded_runs_leave_no_hook_no_tensor_and_the_clean_logits():
    done = _walk(CI_RUNS, seed=1)
    assert sum(done.values()) == CI_RUNS
    _coverage(done)


@pytest.mark.slow
def test_ten_thousand_seeded_runs_leave_no_hook_no_tensor_and_the_clean_logits():
    done = _walk(SLOW_RUNS, seed=2)
    assert sum(done.values()) == SLOW_RUNS
    _coverage(done)
