"""The one table of hook names: shapes and meanings. The model, the cache, name validation
("did you mean ..."), the README's hook table and the tests all read it.

Shape letters: b batch, p position, d d_model, h query heads, g key/value heads, k d_head,
m d_mlp, q/s query/key positions, v d_vocab.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class HookSpec:
    name: str  # the name inside its scope: "hook_q" under "blocks.L.attn"
    scope: str  # "", "blocks.L", "blocks.L.attn", "blocks.L.mlp", "blocks.L.ln1", ...
    shape: str
    meaning: str
    opt_in: bool = False  # left out of a default full cache (costs memory); named to be recorded

    def full_name(self, layer: int | None = None) -> str:
        scope = self.scope.replace("L", str(layer)) if layer is not None else self.scope
        return f"{scope}.{self.name}" if scope else self.name

    @property
    def per_layer(self) -> bool:
        return self.scope.startswith("blocks.L")


HOOKS: tuple[HookSpec, ...] = (
    HookSpec("hook_embed", "", "b p d", "token embeddings (or the inputs_embeds you pass)"),
    HookSpec("hook_resid_pre", "blocks.L", "b p d", "residual stream entering block L"),
    HookSpec("hook_q_input", "blocks.L", "b p h d", "TransformerLens' split input: a per-query-head copy of the residual before ln1, the queries' input; built only when hooked (use_split_qkv_input). While any split input is hooked, attention reads the split copies: ln1's hooks still see the residual's norm but their edits do not reach attention, and logits move by float rounding (~1e-7)", True),
    HookSpec("hook_k_input", "blocks.L", "b p g d", "as hook_q_input, per key/value head: the keys' input", True),
    HookSpec("hook_v_input", "blocks.L", "b p g d", "as hook_q_input, per key/value head: the values' input", True),
    HookSpec("hook_scale", "blocks.L.ln1", "b p 1", "RMSNorm scale sqrt(mean(x^2) + eps) before attention"),
    HookSpec("hook_normalized", "blocks.L.ln1", "b p d", "RMSNorm output (weight applied): the attention's input"),
    HookSpec("hook_q", "blocks.L.attn", "b p h k", "queries (with bias where the model has one)"),
    HookSpec("hook_k", "blocks.L.attn", "b p g k", "keys, one per key/value head (GQA)"),
    HookSpec("hook_v", "blocks.L.attn", "b p g k", "values, one per key/value head (GQA)"),
    HookSpec("hook_rot_q", "blocks.L.attn", "b p h k", "queries after rotary"),
    HookSpec("hook_rot_k", "blocks.L.attn", "b p g k", "keys after rotary"),
    HookSpec("hook_attn_scores", "blocks.L.attn", "b h q s", "pre-softmax scores, scaled and masked (-inf); built only when asked for (explicit attention path)"),
    HookSpec("hook_pattern", "blocks.L.attn", "b h q s", "attention probabilities; built only when asked for (explicit attention path)"),
    HookSpec("hook_z", "blocks.L.attn", "b p h k", "per-head attention output before o_proj"),
    HookSpec("hook_result", "blocks.L.attn", "b p h d", "per-head contribution to the residual (not in a default full cache: costs b·p·h·d)", True),
    HookSpec("hook_attn_out", "blocks.L", "b p d", "attention output"),
    HookSpec("hook_resid_mid", "blocks.L", "b p d", "residual after attention, before the MLP"),
    HookSpec("hook_mlp_in", "blocks.L", "b p d", "TransformerLens' MLP input: a copy of hook_resid_mid that feeds ln2 and the MLP only (editing it leaves the residual); built only when hooked (use_hook_mlp_in)", True),
    HookSpec("hook_scale", "blocks.L.ln2", "b p 1", "RMSNorm scale before the MLP"),
    HookSpec("hook_normalized", "blocks.L.ln2", "b p d", "RMSNorm output (weight applied): the MLP's input"),
    HookSpec("hook_pre", "blocks.L.mlp", "b p m", "gate pre-activation (gate_proj)"),
    HookSpec("hook_pre_linear", "blocks.L.mlp", "b p m", "up projection (up_proj)"),
    HookSpec("hook_post", "blocks.L.mlp", "b p m", "neurons: act(gate) * up, the input of down_proj"),
    HookSpec("hook_mlp_out", "blocks.L", "b p d", "MLP output"),
    HookSpec("hook_resid_post", "blocks.L", "b p d", "residual stream leaving block L"),
    HookSpec("hook_scale", "ln_final", "b p 1", "final RMSNorm scale"),
    HookSpec("hook_normalized", "ln_final", "b p d", "final RMSNorm output (weight applied): the unembedding's input"),
    HookSpec("hook_in", "unembed", "b p d", "the unembedding's input (TransformerLens' name; = ln_final.hook_normalized, last position only with last_logits_only)"),
    HookSpec("hook_out", "unembed", "b p v", "logits"),
)

# TransformerLens short names for get_act_name / cache["resid_post", 3].
_SHORT_NAMES = {
    "embed": "hook_embed",
    "resid_pre": "blocks.L.hook_resid_pre",
    "resid_mid": "blocks.L.hook_resid_mid",
    "resid_post": "blocks.L.hook_resid_post",
    "attn_out": "blocks.L.hook_attn_out",
    "mlp_out": "blocks.L.hook_mlp_out",
    "q": "blocks.L.attn.hook_q",
    "k": "blocks.L.attn.hook_k",
    "v": "blocks.L.attn.hook_v",
    "rot_q": "blocks.L.attn.hook_rot_q",
    "rot_k": "blocks.L.attn.hook_rot_k",
    "attn_scores": "blocks.L.attn.hook_attn_scores",
    "scores": "blocks.L.attn.hook_attn_scores",
    "pattern": "blocks.L.attn.hook_pattern",
    "attn": "blocks.L.attn.hook_pattern",
    "z": "blocks.L.attn.hook_z",
    "result": "blocks.L.attn.hook_result",
    "pre": "blocks.L.mlp.hook_pre",
    "pre_linear": "blocks.L.mlp.hook_pre_linear",
    "post": "blocks.L.mlp.hook_post",
    "mlp_post": "blocks.L.mlp.hook_post",
    "mlp_pre": "blocks.L.mlp.hook_pre",
    "scale": "blocks.L.ln{n}.hook_scale",
    "normalized": "blocks.L.ln{n}.hook_normalized",
}


def all_hook_names(n_layers: int) -> list[str]:
    """Every hook name of a model with n_layers, in the order they fire in a forward pass."""
    head = [s.full_name() for s in HOOKS if not s.per_layer and s.scope == ""]
    tail = [s.full_name() for s in HOOKS if not s.per_layer and s.scope != ""]
    body = [s.full_name(layer) for layer in range(n_layers) for s in HOOKS if s.per_layer]
    return head + body + tail


_SPEC_BY_GENERIC_NAME = {spec.full_name(): spec for spec in HOOKS}
_LAYER_PREFIX = re.compile(r"^blocks\.\d+")


def spec_of(name: str) -> HookSpec:
    """The table row for a full hook name (raises KeyError if it is not one)."""
    spec = _SPEC_BY_GENERIC_NAME.get(_LAYER_PREFIX.sub("blocks.L", name))
    if spec is None:
        raise KeyError(name)
    return spec


def layer_of(name: str) -> int | None:
    match = re.match(r"^blocks\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def stop_layer(names: Iterable[str], n_layers: int) -> int | None:
    """The block a forward that only needs `names` can stop before: one past the deepest
    `blocks.N.` hook (0 for the embedding alone); None when it must run every block (a hook past
    the blocks, or the last block's)."""
    deepest = -1
    for name in names:
        layer = layer_of(name)
        if layer is not None:
            deepest = max(deepest, layer)
        elif not name.startswith("hook_embed"):
            return None
    return deepest + 1 if deepest + 1 < n_layers else None


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """TransformerLens' helper: get_act_name("resid_pre", 3) == "blocks.3.hook_resid_pre".

    Full names pass through unchanged; TL's compact keys too ("resid_pre3", "scale4ln1"). For
    "scale"/"normalized", layer_type picks "ln1" or "ln2" (without a layer, the final norm)."""
    if "." in name or name.startswith("hook_"):
        return name
    compact = re.fullmatch(r"([a-z_]+?)(\d+)(ln[12])?", name)  # TL's compact keys: "resid_pre3", "scale4ln1"
    if name not in _SHORT_NAMES and compact and compact.group(1) in _SHORT_NAMES and layer is None:
        name, layer, layer_type = compact.group(1), int(compact.group(2)), compact.group(3) or layer_type
    if name not in _SHORT_NAMES:
        close = difflib.get_close_matches(name, list(_SHORT_NAMES), n=5, cutoff=0.4)
        raise KeyError(f"unknown activation name {name!r}; did you mean {close or sorted(_SHORT_NAMES)}?")
    template = _SHORT_NAMES[name]
    if name in ("scale", "normalized"):
        if layer is None:
            return f"ln_final.hook_{name}"
        ln = layer_type or "ln1"
        if ln not in ("ln1", "ln2"):
            raise KeyError(f"layer_type must be 'ln1' or 'ln2' for {name!r}, got {layer_type!r}")
        return f"blocks.{layer}.{ln}.hook_{name}"
    if "blocks.L" in template:
        if layer is None:
            raise KeyError(f"{name!r} is a per-layer activation: give a layer, e.g. get_act_name({name!r}, 0)")
        return template.replace("blocks.L", f"blocks.{layer}")
    return template


def suggest(name: str, valid: list[str], n: int = 5) -> list[str]:
    """The valid names closest to a mistyped one."""
    return difflib.get_close_matches(name, valid, n=n, cutoff=0.0)


def markdown_table() -> str:
    """The README's hook table (tests check the README against it)."""
    rows = ["| hook | shape | what it is |", "|---|---|---|"]
    for spec in HOOKS:
        label = f"`{spec.full_name()}`" + (" (opt-in)" if spec.opt_in else "")
        rows.append(f"| {label} | {spec.shape} | {spec.meaning} |")
    return "\n".join(rows)
