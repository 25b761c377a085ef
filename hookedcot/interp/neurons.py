"""Neuron traces: one MLP neuron's activation at every position, labelled by token.

    r = trace_neurons(model, text, layer=24, neuron=609)           # Result [position]
    r = trace_neurons_while_generating(model, prompt, 24, 609, max_new_tokens=200)
    r.plot("neuron_24_609.png"); r.to_pandas()

A neuron is `blocks.{layer}.mlp.hook_post[..., neuron]` — act(gate) · up, the input of down_proj
(TransformerLens' `mlp_post`). Pass `hook="pre"` for the gate pre-activation instead. Several
neurons at once give a Result [neuron, position].
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from hookedcot.hook_names import get_act_name
from hookedcot.interp.labels import token_labels
from hookedcot.interp.renamed import renamed
from hookedcot.interp.results import Result


def _neuron_list(neuron: int | Sequence[int], d: int) -> list[int]:
    items = [neuron] if isinstance(neuron, int) else [int(n) for n in neuron]
    if bad := [n for n in items if not 0 <= n < d]:
        raise ValueError(f"neurons {bad} out of range: the layer has {d} neurons")
    return items


def _result(values: list[Tensor], neurons: list[int], single: bool, labels: list[str], layer: int, hook: str,
            meta: dict[str, Any]) -> Result:
    stacked = torch.cat(values, dim=0).T  # [neuron, position]
    meta = {"layer": layer, "hook": hook, "neurons": neurons, **meta}
    if single:
        return Result(stacked[0], ("position",), {"position": labels}, name=f"neuron_L{layer}_N{neurons[0]}", meta=meta)
    return Result(stacked, ("neuron", "position"), {"neuron": [str(n) for n in neurons], "position": labels},
                  name=f"neurons_L{layer}", meta=meta)


@torch.no_grad()
def trace_neurons(model: Any, input: str | Tensor, layer: int, neuron: int | Sequence[int], hook: str = "post",
                 fwd_hooks: Sequence = ()) -> Result:
    """The neuron's activation at every position of one sequence (a string or token ids [pos] /
    [1, pos]), as a Result over positions labelled by `token_labels`. The forward stops after `layer`.
    `fwd_hooks` (e.g. steering) are active during the run."""
    tokens = model.to_tokens(input) if isinstance(input, str) else (input[None] if input.dim() == 1 else input).to(model.device)
    if tokens.shape[0] != 1:
        raise ValueError(f"trace_neurons takes one sequence, got a batch of {tokens.shape[0]}; call it per row")
    name = get_act_name(hook, layer)
    neurons = _neuron_list(neuron, model.cfg.d_mlp)
    seen: list[Tensor] = []

    def record(x: Tensor, h: Any) -> None:
        seen.append(x[0, :, neurons].float().cpu())

    model.run_with_hooks(tokens, fwd_hooks=list(fwd_hooks) + [(name, record)], stop_at_layer=layer + 1)
    return _result(seen, neurons, isinstance(neuron, int), token_labels(model, tokens), layer, name, {})


@torch.no_grad()
def trace_neurons_while_generating(model: Any, prompt: str | Tensor, layer: int, neuron: int | Sequence[int],
                          max_new_tokens: int = 64, hook: str = "post", **gen_kwargs: Any) -> Result:
    """Generate from `prompt` (one sequence) and record the neuron on the prompt and on each new
    token as it is fed back, with the KV cache. Labels are the prompt and generated tokens; the
    last sampled token is never fed back into the model, so it has no activation and is not in the
    trace (its text is in `meta["generated"]`). `meta["prompt_len"]` marks where generation starts.
    Extra `gen_kwargs` (e.g. `fwd_hooks=` for steering, `do_sample=`) go to `model.generate`."""
    name = get_act_name(hook, layer)
    neurons = _neuron_list(neuron, model.cfg.d_mlp)
    seen: list[Tensor] = []
    seen_pos: list[int] = []

    def record(x: Tensor, h: Any) -> None:
        if x.shape[0] != 1:
            raise ValueError("trace_neurons_while_generating takes one prompt")
        seen.append(x[0, :, neurons].float().cpu())
        seen_pos.extend(h.positions.tolist())

    tokens = model.to_tokens(prompt) if isinstance(prompt, str) else (prompt[None] if prompt.dim() == 1 else prompt).to(model.device)
    extra = list(gen_kwargs.pop("fwd_hooks", ()))
    out = model.generate(tokens, max_new_tokens, fwd_hooks=extra + [(name, record)], return_type="tokens", **gen_kwargs)
    ids = out[0].tolist()
    n = len(seen_pos)
    if seen_pos != list(range(n)):
        raise RuntimeError(f"trace_neurons_while_generating: the hook saw positions {seen_pos[:8]}..., not 0..{n - 1} in order")
    meta = {"prompt_len": tokens.shape[1], "tokens": ids, "generated": token_labels(model, ids, range(n, len(ids)))}
    return _result(seen, neurons, isinstance(neuron, int), token_labels(model, ids[:n]), layer, name, meta)


neuron_trace = renamed(trace_neurons, "neuron_trace")
neuron_trace_generate = renamed(trace_neurons_while_generating, "neuron_trace_generate")
