"""Sparse autoencoders in the formats people publish, attached to a model by hook name.

`load_sae(path)` reads
- a SAELens folder: `cfg.json` (current SAELens: `d_in`, `d_sae`, `architecture` at the top level
  and `hook_name` under `metadata`; older files: `hook_name` or `hook_point` at the top level,
  `activation_fn_str` / `activation_fn_kwargs.k` for TopK) and `sae_weights.safetensors`
  (`W_enc` [d_in, d_sae], `b_enc`, `W_dec` [d_sae, d_in], `b_dec`, `threshold` for JumpReLU);
- an EleutherAI sparsify folder: one subfolder per module (`layers.6`, `layers.6.mlp`, ...) with
  `cfg.json` (`k`, `num_latents` or `expansion_factor`) and `sae.safetensors` (`encoder.weight`
  [d_sae, d_in], `encoder.bias`, `W_dec`, `b_dec`); the decoder's orientation is read from its
  shape. Module names map to hook names by what the module outputs: `layers.N` is the residual
  after block N (`blocks.N.hook_resid_post`), `layers.N.mlp` the MLP's output
  (`blocks.N.hook_mlp_out`), `layers.N.self_attn` the attention's (`blocks.N.hook_attn_out`).

Architectures: "standard" (ReLU), "jumprelu" (pre-activations kept where above `threshold`),
"topk" (the k largest pre-activations, ReLU'd). `SAE.save(folder)` writes the SAELens layout.

Attaching (`sae.hook(edit=..., error=True)` -> a `(hook name, function)` pair for `fwd_hooks=` or
`model.hooks(...)`): the activation is encoded, the features edited, decoded and written back. With
`error=True` (default) the reconstruction error is kept: the hook writes
`x + decode(edited) - decode(features)`, which is `x` itself, bit for bit, when the edit changes
nothing, and `decode(edited) + (x - decode(features))` otherwise; `error=False` writes the
reconstruction alone. With no edit or a zero / scale / clamp `FeatureEdit`, the function is an
`SAESplice`: a declarative intervention, so generation keeps its static or compiled decode step.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor, nn

from hookedcot.dictionaries.files import (DictionaryFileError, DictionaryFileNotFoundError, float_tensor, optional_type,
                                          positive_int, read_json_object, read_tensors)
from hookedcot.interp.interventions import Intervention, Where, _index_mask
from hookedcot.interp.positions import Positions

ARCHITECTURES = ("standard", "jumprelu", "topk")
SAELENS_WEIGHTS, SAELENS_CFG = "sae_weights.safetensors", "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"


class SAE(nn.Module):
    """encode: [..., d_in] -> [..., d_sae]; decode: [..., d_sae] -> [..., d_in]."""

    def __init__(self, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, *, architecture: str = "standard",
                 hook_name: str | None = None, threshold: Tensor | None = None, k: int | None = None,
                 apply_b_dec_to_input: bool = True, meta: dict[str, Any] | None = None):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}")
        d_in, d_sae = W_enc.shape
        expected = {"b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
        got = {"b_enc": tuple(b_enc.shape), "W_dec": tuple(W_dec.shape), "b_dec": tuple(b_dec.shape)}
        if threshold is not None:
            expected["threshold"], got["threshold"] = (d_sae,), tuple(threshold.shape)
        if bad := {n: s for n, s in got.items() if s != expected[n]}:
            raise ValueError(f"SAE tensor shapes {bad} do not fit W_enc {tuple(W_enc.shape)} [d_in, d_sae]; "
                             f"expected {{{', '.join(f'{n}: {expected[n]}' for n in bad)}}}")
        if architecture == "jumprelu" and threshold is None:
            raise ValueError("a JumpReLU SAE needs its 'threshold' tensor [d_sae]")
        if architecture == "topk" and not k:
            raise ValueError("a TopK SAE needs k (cfg.json 'k', or activation_fn_kwargs.k in older files)")
        self.W_enc, self.b_enc = nn.Parameter(W_enc, requires_grad=False), nn.Parameter(b_enc, requires_grad=False)
        self.W_dec, self.b_dec = nn.Parameter(W_dec, requires_grad=False), nn.Parameter(b_dec, requires_grad=False)
        self.threshold = None if threshold is None else nn.Parameter(threshold, requires_grad=False)
        self.architecture, self.hook_name, self.k = architecture, hook_name, k
        self.apply_b_dec_to_input, self.meta = apply_b_dec_to_input, dict(meta or {})
        self.d_in, self.d_sae = d_in, d_sae

    def encode(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... d_sae"]:
        x = x.to(self.W_enc.dtype)
        pre = (x - self.b_dec if self.apply_b_dec_to_input else x) @ self.W_enc + self.b_enc
        if self.architecture == "jumprelu":
            return pre * (pre > self.threshold) * (pre > 0)
        if self.architecture == "topk":
            values, indices = pre.topk(min(self.k, self.d_sae), dim=-1)
            return torch.zeros_like(pre).scatter(-1, indices, values.relu())
        return pre.relu()

    def decode(self, features: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_in"]:
        return features @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def hook(self, edit: "FeatureEdit | Callable[[Tensor, Any], Tensor] | None" = None, *, error: bool = True,
             hook_name: str | None = None) -> tuple[str, Callable]:
        """`(hook name, hook function)` splicing this SAE in: encode, `edit(features, hook)`,
        decode, write back (module docstring). `hook_name` overrides the SAE's own."""
        name = hook_name or self.hook_name
        if name is None:
            raise ValueError("this SAE does not know its hook name: pass hook_name= (e.g. 'blocks.6.hook_resid_post')")
        if edit is None or (isinstance(edit, FeatureEdit) and edit.op != "patch" and edit._compiled.kind != "callable"):
            return name, SAESplice(self, edit, error)  # tensor ops only: runs inside a static / compiled decode step

        def splice(x: Tensor, hook: Any) -> Tensor:
            features = self.encode(x)
            edited = features if edit is None else edit(features, hook)
            if not error:
                return self.decode(edited).to(x.dtype)
            return x + (self.decode(edited) - self.decode(features)).to(x.dtype)

        return name, splice

    def save(self, folder: str | Path) -> Path:
        """The SAELens layout: `cfg.json` (current keys, plus `hook_name` at the top level for older
        readers) and `sae_weights.safetensors`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        if self.threshold is not None:
            tensors["threshold"] = self.threshold
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, folder / SAELENS_WEIGHTS)
        cfg = {"d_in": self.d_in, "d_sae": self.d_sae, "architecture": self.architecture,
               "apply_b_dec_to_input": self.apply_b_dec_to_input, "dtype": str(self.W_enc.dtype).removeprefix("torch."),
               "hook_name": self.hook_name, "metadata": {"hook_name": self.hook_name, **self.meta.get("metadata", {})}}
        if self.k:
            cfg["k"] = self.k
        (folder / SAELENS_CFG).write_text(json.dumps(cfg, indent=1))
        return folder

    def __repr__(self) -> str:
        return f"SAE({self.architecture}, d_in {self.d_in}, d_sae {self.d_sae}" + (f", k {self.k}" if self.k else "") + \
            f", hook {self.hook_name!r})"


@dataclass
class FeatureEdit:
    """An edit of SAE features, at chosen features and positions (`positions`: any form of the
    position grammar, read against the absolute positions the hook sees, so it works during
    generation too). `op`: "zero", "scale" (by `value`), "clamp" (set to `value`), or "patch" (take
    the values of `source` [batch or 1, pos, d_sae], e.g. another model's features on the same
    tokens, at the same absolute positions; or a callable `source(hook)` giving them at
    `hook.positions`, as `FeaturePatch` does while a model generates)."""

    op: str
    features: Sequence[int] | None = None  # None: every feature
    value: float = 0.0
    positions: Any = None
    source: Tensor | Callable[[Any], Tensor] | None = None
    _compiled: Positions = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.op not in ("zero", "scale", "clamp", "patch"):
            raise ValueError(f"unknown feature edit {self.op!r}; use 'zero', 'scale', 'clamp' or 'patch'")
        if self.op == "patch" and self.source is None:
            raise ValueError("a 'patch' edit needs source= (the features to copy, [batch, pos, d_sae])")
        self._compiled = Positions(self.positions)

    def __call__(self, features: Tensor, hook: Any) -> Tensor:
        where = self._compiled(hook.positions)  # [p] bool, or None for every position
        cols = slice(None) if self.features is None else torch.as_tensor(list(self.features), dtype=torch.long, device=features.device)
        out = features.clone()
        rows = slice(None) if where is None else where.to(features.device)
        current = out[:, rows][..., cols]
        if self.op == "zero":
            new = torch.zeros_like(current)
        elif self.op == "scale":
            new = current * self.value
        elif self.op == "clamp":
            new = torch.full_like(current, self.value)
        else:
            new = self._source_at(hook).to(features.device, features.dtype)[:, rows][..., cols].expand_as(current)
        block = out[:, rows]
        block[..., cols] = new
        out[:, rows] = block
        return out

    def _source_at(self, hook: Any) -> Tensor:
        if callable(self.source):
            return self.source(hook)
        if len(hook.positions) and int(hook.positions.max()) >= self.source.shape[1]:
            raise ValueError(f"the patch source covers {self.source.shape[1]} positions but {hook.name} reads position "
                             f"{int(hook.positions.max())}; during generation patch from a model running alongside "
                             "(hookedcot.dictionaries.FeaturePatch)")
        return self.source[:, hook.positions.to(self.source.device)]


class SAESplice(Intervention):
    """`SAE.hook` with no edit or a zero / scale / clamp `FeatureEdit` at declarative positions, as a
    declarative intervention (hookedcot.interp.interventions): the same numbers as the hook function
    (tensor `where`s instead of index writes, which pick the same values), and it runs inside a
    static or compiled decode step. A "patch" edit or a callable edit stays a hook function."""

    def __init__(self, sae: SAE, edit: FeatureEdit | None, error: bool):
        self.sae, self.error = sae, error
        self.op, self.value = (edit.op, float(edit.value)) if edit is not None else ("none", 0.0)
        self.where = Where(edit.positions if edit is not None else None)
        features = None if edit is None or edit.features is None else list(edit.features)
        self.columns = None if features is None else _index_mask(features, sae.d_sae, "feature", "this SAE",
                                                                 torch.device("cpu"))

    def edit(self, x: Tensor, name: str, positions: Tensor) -> Tensor:
        sae = self.sae
        features = sae.encode(x)
        if self.op == "none":
            edited = features
        else:
            new = torch.zeros_like(features) if self.op == "zero" else (
                features * self.value if self.op == "scale" else torch.full_like(features, self.value))
            mask = self._on("columns", features) if self.columns is not None else None
            if not self.where.positions.all:
                rows = self.where.position_mask(positions.to(x.device))  # [p], on the position axis (1)
                rows = rows.view(1, -1, *[1] * (features.dim() - 2))
                mask = rows if mask is None else rows & mask
            edited = new if mask is None else torch.where(mask, new, features)
        if not self.error:
            return sae.decode(edited).to(x.dtype)
        return x + (sae.decode(edited) - sae.decode(features)).to(x.dtype)

    def structure(self) -> tuple:
        return (*super().structure(), id(self.sae))  # another SAE of the same shape is another graph


# ---------------------------------------------------------------------------------------- loading
def load_sae(path: str | Path, *, hook_name: str | None = None, device: Any = None, dtype: Any = None) -> SAE | dict[str, SAE]:
    """A SAELens or sparsify folder (module docstring). A sparsify folder holding several modules
    gives {hook name: SAE}; a folder of one module (or the module's own subfolder) one SAE. The
    files are untrusted: whatever is wrong with them is a `DictionaryFileError` (files.py)."""
    path = Path(path)
    if not path.is_dir():
        raise DictionaryFileNotFoundError(f"{path} is not a folder; an SAE is a folder with cfg.json and "
                                          f"{SAELENS_WEIGHTS} (SAELens) or {SPARSIFY_WEIGHTS} (sparsify)")
    if (path / SAELENS_WEIGHTS).exists():
        sae = _load_saelens(path)
    elif (path / SPARSIFY_WEIGHTS).exists():
        sae = _load_sparsify(path, path.name)
    else:
        subs = sorted(p for p in path.iterdir() if (p / SPARSIFY_WEIGHTS).exists())
        if not subs:
            raise DictionaryFileNotFoundError(
                f"{path} holds neither {SAELENS_WEIGHTS} (SAELens) nor {SPARSIFY_WEIGHTS} in it or its subfolders "
                f"(sparsify); found {sorted(p.name for p in path.iterdir())[:10]}")
        saes = [_load_sparsify(p, p.name) for p in subs]
        out = {s.hook_name: s.to(device=device, dtype=dtype) if (device or dtype) else s for s in saes}
        return out if len(out) > 1 or hook_name is None else next(iter(out.values()))
    if hook_name is not None:
        sae.hook_name = hook_name
    return sae.to(device=device, dtype=dtype) if (device or dtype) else sae


def _build(where: Path, tensors: dict[str, Tensor], **kwargs: Any) -> SAE:
    """SAE(...) with every tensor checked (floating point, finite) and its shape errors as file errors."""
    checked = {n: float_tensor(where, n, t, ndim=2 if n in ("W_enc", "W_dec") else 1) if t is not None else None
               for n, t in tensors.items()}
    try:
        return SAE(checked["W_enc"], checked["b_enc"], checked["W_dec"], checked["b_dec"],
                   threshold=checked.get("threshold"), **kwargs)
    except ValueError as exc:
        raise DictionaryFileError(f"{where}: {exc}") from None


def _load_saelens(folder: Path) -> SAE:
    cfg_path, weights_path = folder / SAELENS_CFG, folder / SAELENS_WEIGHTS
    if not cfg_path.is_file():
        raise DictionaryFileNotFoundError(f"{cfg_path} not found; a SAELens folder holds {SAELENS_CFG} beside "
                                          f"{SAELENS_WEIGHTS}")
    cfg = read_json_object(cfg_path)
    w = read_tensors(weights_path)
    missing = sorted({"W_enc", "b_enc", "W_dec", "b_dec"} - set(w))
    if missing:
        raise DictionaryFileError(f"{weights_path} lacks {missing}; a SAELens SAE has W_enc, b_enc, W_dec, b_dec "
                                  f"(and threshold for JumpReLU); found {sorted(w)}")
    meta = optional_type(cfg_path, cfg, "metadata", (dict,)) or {}
    hook = optional_type(cfg_path, meta, "hook_name", (str,)) or optional_type(cfg_path, cfg, "hook_name", (str,)) \
        or optional_type(cfg_path, cfg, "hook_point", (str,))
    activation = optional_type(cfg_path, cfg, "activation_fn_str", (str,))
    arch = optional_type(cfg_path, cfg, "architecture", (str,)) or ("topk" if activation == "topk" else "standard")
    arch = {"relu": "standard", "jump_relu": "jumprelu"}.get(arch, arch)
    if arch not in ARCHITECTURES:
        raise DictionaryFileError(f"{cfg_path}: architecture {arch!r} is not one this loader knows "
                                  f"({', '.join(ARCHITECTURES)}, or 'relu' / 'jump_relu')")
    k = positive_int(cfg_path, cfg, "k", required=False)
    if k is None:
        kwargs = optional_type(cfg_path, cfg, "activation_fn_kwargs", (dict,)) or {}
        k = positive_int(cfg_path, kwargs, "k", required=False)
    for key in ("d_in", "d_sae"):
        positive_int(cfg_path, cfg, key, required=False)
    apply_b_dec = optional_type(cfg_path, cfg, "apply_b_dec_to_input", (bool,))
    threshold = w.get("threshold")
    if threshold is None and "log_threshold" in w:
        threshold = float_tensor(weights_path, "log_threshold", w["log_threshold"]).exp()
    sae = _build(weights_path, {"W_enc": w["W_enc"], "b_enc": w["b_enc"], "W_dec": w["W_dec"], "b_dec": w["b_dec"],
                                "threshold": threshold}, architecture=arch, hook_name=hook, k=k,
                 apply_b_dec_to_input=True if apply_b_dec is None else apply_b_dec, meta={"cfg": cfg})
    for key, got in (("d_in", sae.d_in), ("d_sae", sae.d_sae)):
        if cfg.get(key) is not None and cfg[key] != got:
            raise DictionaryFileError(f"{cfg_path} says {key}={cfg[key]} but {weights_path} holds W_enc "
                                      f"{tuple(sae.W_enc.shape)} [d_in, d_sae]: the files do not belong together")
    return sae


def sparsify_hook_name(module: str) -> str:
    """sparsify's module name -> our hook name, by what the module outputs."""
    parts = module.removeprefix("model.").removeprefix("gpt_neox.").split(".")
    if parts[0] == "embed_tokens" and len(parts) == 1:
        return "hook_embed"
    if len(parts) >= 2 and parts[0] in ("layers", "h") and parts[1].isdigit():
        layer, rest = parts[1], ".".join(parts[2:])
        names = {"": "hook_resid_post", "mlp": "hook_mlp_out", "self_attn": "hook_attn_out"}
        if rest in names:
            return f"blocks.{layer}.{names[rest]}"
    raise ValueError(f"no hook name for the sparsify module {module!r}: known are 'layers.N' (the residual after "
                     "block N), 'layers.N.mlp', 'layers.N.self_attn' and 'embed_tokens'; pass hook_name=")


def _load_sparsify(folder: Path, module: str) -> SAE:
    cfg_path, weights_path = folder / "cfg.json", folder / SPARSIFY_WEIGHTS
    cfg = read_json_object(cfg_path) if cfg_path.exists() else {}
    w = read_tensors(weights_path)
    missing = sorted({"encoder.weight", "encoder.bias", "W_dec", "b_dec"} - set(w))
    if missing:
        raise DictionaryFileError(f"{weights_path} lacks {missing}; a sparsify SAE has encoder.weight, "
                                  f"encoder.bias, W_dec, b_dec; found {sorted(w)}")
    enc = float_tensor(weights_path, "encoder.weight", w["encoder.weight"], ndim=2)  # [d_sae, d_in], nn.Linear's layout
    d_sae, d_in = enc.shape
    dec = w["W_dec"]
    if tuple(dec.shape) == (d_in, d_sae) and d_in != d_sae:
        dec = dec.T  # some versions store the decoder [d_in, d_sae]
    k = positive_int(cfg_path, cfg, "k", required=False)
    latents = positive_int(cfg_path, cfg, "num_latents", required=False)
    if latents is not None and latents != d_sae:
        raise DictionaryFileError(f"{cfg_path} says num_latents={latents} but {weights_path} holds encoder.weight "
                                  f"{tuple(enc.shape)} [d_sae, d_in]: the files do not belong together")
    try:
        hook = sparsify_hook_name(module)
    except ValueError as exc:
        raise DictionaryFileError(str(exc)) from None
    return _build(weights_path, {"W_enc": enc.T.contiguous(), "b_enc": w["encoder.bias"], "W_dec": dec.contiguous(),
                                 "b_dec": w["b_dec"]}, architecture="topk" if k else "standard", hook_name=hook, k=k,
                  apply_b_dec_to_input=True, meta={"cfg": cfg, "module": module})
