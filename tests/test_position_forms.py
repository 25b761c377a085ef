"""Every interp tool that takes positions × every documented position form: the tool touches
exactly the positions `resolve_positions(form, n)` names, and a form it cannot read raises a
ValueError listing the accepted forms.

Hook builders are checked by what they change: the hooked activation differs from the plain run's
at exactly those positions. Whole-prompt tools are checked against hand-written oracles (plain
`run_with_hooks` with a hand-written patching hook) and by their position labels.

The model is tiny and random but carries SmolLM2's real tokenizer, so `model.find_positions`
works and labels are real tokens.
"""

from __future__ import annotations

import re

import pytest
import torch
from model_factory import random_model

import hookedcot.interp as interp
from hookedcot import HookedCoT, ModelConfig, get_act_name
from hookedcot.interp.labels import token_labels
from hookedcot.interp.positions import ACCEPTED_FORMS, resolve_positions

CLEAN = "Q: 12 apples and 34 pears?\nA:"
CORRUPTED = "Z: 12 apples and 34 pears?\nA:"  # differs at position 0, so every position can be told apart
TARGET = 100  # the metric: this token's logit at the last position
N_LAYERS = 3

FORMS = {
    "int": 3,
    "negative int": -2,
    "list": [1, 4, 7],
    "range": range(2, 5),
    "LongTensor": torch.tensor([0, 5]),
    "slice": slice(2, 6),
    "negative slice": slice(-4, -1),
    "'all'": "all",
    "None": None,
    "'last N'": "last 3",
    "'from N'": "from 9",
    "callable": lambda p: p % 4 == 1,
    "find_positions": "apples and",  # replaced by model.find_positions(tokens, "apples and")
}
BAD_FORMS = {"unknown words": "after 3", "a float": 2.5}


@pytest.fixture(scope="module")
def model(smol) -> HookedCoT:
    cfg = ModelConfig(n_layers=N_LAYERS, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64,
                      d_vocab=smol.config.d_vocab, norm_eps=1e-6)
    return random_model(cfg, seed=3, tokenizer=smol.tokenizer)


@pytest.fixture(scope="module")
def prompts(model):
    clean, corrupted = model.to_tokens(CLEAN, prepend_bos=False), model.to_tokens(CORRUPTED, prepend_bos=False)
    assert clean.shape == corrupted.shape and not torch.equal(clean[:, 0], corrupted[:, 0])
    return clean, corrupted


def metric(logits):
    return logits[:, -1, TARGET].float()


def as_form(model, tokens, label):
    form = FORMS[label]
    return model.find_positions(tokens, form) if label == "find_positions" else form


# ---------------------------------------------------------------- hook builders
@pytest.fixture(scope="module")
def hook_builders(model, prompts):
    """tool name -> (hook it edits, fn(positions) -> (name, hook_fn))."""
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    others = torch.randint(300, 30000, (3, prompts[0].shape[1]), generator=torch.Generator().manual_seed(1))
    resid, mlp_out = "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"
    mean = interp.activation_mean(model, mlp_out, others)
    return {
        "ablate_zero": (resid, lambda p: interp.ablate_zero(resid, positions=p)),
        "ablate_mean": (mlp_out, lambda p: interp.ablate_mean(model, mlp_out, mean=mean, positions=p)),
        "ablate_resample": ("blocks.1.hook_resid_pre",
                            lambda p: interp.ablate_resample(model, "blocks.1.hook_resid_pre", others, positions=p)),
        "ablate_neurons": (get_act_name("post", 1), lambda p: interp.ablate_neurons(1, [3, 5], positions=p)),
        "ablate_heads": (get_act_name("z", 2), lambda p: interp.ablate_heads(2, [1], positions=p)),
        "ablate_direction": (resid, lambda p: interp.ablate_direction(resid, v, positions=p)),
        "add_vector": (resid, lambda p: interp.add_vector(resid, v, 1.0, positions=p)),
        "scale_direction": (resid, lambda p: interp.scale_direction(resid, v, 2.0, positions=p)),
        "add_noise": ("hook_embed", lambda p: interp.add_noise("hook_embed", 1.0, positions=p)),
    }


HOOK_BUILDERS = ["ablate_zero", "ablate_mean", "ablate_resample", "ablate_neurons", "ablate_heads", "ablate_direction",
                 "add_vector", "scale_direction", "add_noise"]


def changed_positions(model, tokens, name, pair):
    seen = {}

    def record(x, hook):
        seen[hook.name] = x.clone()

    model.run_with_hooks(tokens, fwd_hooks=[(name, record)])
    plain = seen.pop(name)
    model.run_with_hooks(tokens, fwd_hooks=[pair, (name, record)])
    return (seen[name] != plain).flatten(2).any(-1).any(0).nonzero()[:, 0].tolist()


# ---------------------------------------------------------------- whole-prompt tools
CLEAN_ACTS: dict[str, torch.Tensor] = {}


@torch.no_grad()
def patched_metric(model, clean, corrupted, name, positions, heads=None):
    """The oracle: the corrupted run with the clean activation written at `positions` (and `heads`)."""
    if name not in CLEAN_ACTS:
        CLEAN_ACTS[name] = model.run_with_cache(clean, names_filter=name)[1][name]
    source = CLEAN_ACTS[name]

    def write(x, hook):
        x = x.clone()
        for h in ([None] if heads is None else heads):
            at = (slice(None), positions) if h is None else (slice(None), positions, h)
            x[at] = source[at]
        return x

    return metric(model.run_with_hooks(corrupted, fwd_hooks=[(name, write)]))[0]


def close(a, b):
    torch.testing.assert_close(torch.as_tensor(a).detach().float(), torch.as_tensor(b).float(), rtol=1e-4, atol=1e-4)


def check_patch_layer_position(model, clean, corrupted, form):
    r = interp.patch_layer_position(model, clean, corrupted, metric=metric, positions=form, progress=False)
    expected = resolve_positions(form, clean.shape[1])
    assert r.labels["position"] == token_labels(model, corrupted, expected)
    oracle = [[patched_metric(model, clean, corrupted, get_act_name("resid_pre", l), [p]) for p in expected]
              for l in range(N_LAYERS)]
    close(r.values, oracle)


def check_patch_layers(model, clean, corrupted, form):
    r = interp.patch_layers(model, clean, corrupted, metric=metric, positions=form, progress=False)
    expected = resolve_positions(form, clean.shape[1])
    close(r.values, [patched_metric(model, clean, corrupted, get_act_name("resid_pre", l), expected) for l in range(N_LAYERS)])


def check_patch_heads(model, clean, corrupted, form):
    r = interp.patch_heads(model, clean, corrupted, metric=metric, positions=form, progress=False)
    expected = resolve_positions(form, clean.shape[1])
    close(r.values, [[patched_metric(model, clean, corrupted, get_act_name("z", l), expected, heads=[h]) for h in range(4)]
                     for l in range(N_LAYERS)])


def check_patch_components(model, clean, corrupted, form):
    components = ("resid_pre", "attn_out")
    r = interp.patch_components(model, clean, corrupted, metric=metric, components=components, positions=form,
                                progress=False)
    expected = resolve_positions(form, clean.shape[1])
    close(r.values, [[patched_metric(model, clean, corrupted, get_act_name(c, l), expected) for l in range(N_LAYERS)]
                     for c in components])


def check_trace_restoration(model, clean, corrupted, form):
    r = interp.trace_restoration(model, clean, noise_positions=[0, 1], metric=metric, positions=form, progress=False)
    expected = resolve_positions(form, clean.shape[1])
    assert r.labels["position"] == token_labels(model, clean, expected)


def check_patch_in_parallel(model, clean, corrupted, form):
    value = interp.patch_in_parallel(model, clean, corrupted, layer=1, span=form, metric=metric)
    expected = resolve_positions(form, clean.shape[1])
    close(value, patched_metric(model, clean, corrupted, get_act_name("resid_post", 1), expected))


def check_patch_iteratively(model, clean, corrupted, form):
    # With the inputs fixed, patching one position at a time ends in the run with the whole span patched.
    result = interp.patch_iteratively(model, clean, corrupted, layer=1, span=form, metric=metric)
    expected = resolve_positions(form, clean.shape[1])
    close(result.metric, patched_metric(model, clean, corrupted, get_act_name("resid_post", 1), expected))


def check_run_logit_lens(model, clean, corrupted, form):
    lens = interp.run_logit_lens(model, clean, targets=TARGET, positions=form, top_k=3)
    expected = resolve_positions(form, clean.shape[1])
    assert lens.positions == expected and lens.position_labels == token_labels(model, clean, expected)
    logits = model(clean)[0, expected]
    assert torch.equal(lens.top_ids[-1], logits.topk(3, dim=-1).indices)  # the final row read those positions
    assert torch.equal(lens.logit.values[0, -1], logits[:, TARGET].float())


WHOLE_PROMPT = {
    "run_logit_lens": check_run_logit_lens,
    "patch_layer_position": check_patch_layer_position,
    "patch_layers": check_patch_layers,
    "patch_heads": check_patch_heads,
    "patch_components": check_patch_components,
    "trace_restoration": check_trace_restoration,
    "patch_in_parallel": check_patch_in_parallel,
    "patch_iteratively": check_patch_iteratively,
}
TOOLS = HOOK_BUILDERS + list(WHOLE_PROMPT)


def run_tool(tool, model, prompts, builders, form):
    """Run the tool with `form` and check what it touched against `resolve_positions`, which is
    called only after the tool (so a form the tool rejects is the tool's error, not the oracle's)."""
    clean, corrupted = prompts
    if tool in WHOLE_PROMPT:
        WHOLE_PROMPT[tool](model, clean, corrupted, form)
        return
    name, build = builders[tool]
    changed = changed_positions(model, clean, name, build(form))
    assert changed == sorted(resolve_positions(form, clean.shape[1]))


@pytest.mark.parametrize("label", list(FORMS))
@pytest.mark.parametrize("tool", TOOLS)
def test_every_tool_reads_every_position_form(tool, label, model, prompts, hook_builders):
    form = as_form(model, prompts[0], label)
    if label == "find_positions":
        assert form == [5, 6]
    run_tool(tool, model, prompts, hook_builders, form)


@pytest.mark.parametrize("label", list(BAD_FORMS))
@pytest.mark.parametrize("tool", TOOLS)
def test_a_bad_form_raises_with_the_accepted_forms(tool, label, model, prompts, hook_builders):
    with pytest.raises(ValueError, match=re.escape(ACCEPTED_FORMS)):
        run_tool(tool, model, prompts, hook_builders, BAD_FORMS[label])


def test_slices_select_what_python_slicing_selects():
    """Every slice, negative bounds and steps included, picks exactly Python's positions."""
    for n in (1, 5, 8):
        for start in (None, -100, -3, 0, 2, 7):
            for stop in (None, -100, -2, 0, 3, 9):
                for step in (None, 1, 2, 3):
                    spec = slice(start, stop, step)
                    assert resolve_positions(spec, n) == list(range(n))[spec], (spec, n)
