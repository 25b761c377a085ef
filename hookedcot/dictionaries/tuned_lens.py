"""Tuned lens (Belrose et al. 2023): one affine translator per layer, trained so that reading the
residual entering block *i* through the final norm and unembedding matches the model's own output.

    lens, losses = train_tuned_lens(model, texts, steps=200, seed=0)
    kl = lens.kl_per_layer(model, tokens)      # {"tuned": [n_layers], "logit": [n_layers]}
    run_logit_lens(model, "Q: 12*7?\\nA:", targets=" 8", tuned=lens)   # the lens' rows and plots
    lens.save("out/lens")                      # tuned-lens' layout: config.json + params.pt
    lens.save("out/lens_st", format="safetensors"); TunedLens.load("out/lens")

Translator *i* reads `blocks.i.hook_resid_pre` (row `"{i}_pre"` of the logit lens; row 0 is the
embedding) and maps it to `h + A_i h + b_i`, with A_i, b_i zero at the start, so an untrained lens
*is* the logit lens (bit for bit) and weight decay pulls toward it. The final residual needs no
translator: its row is the model's logits.

Files. tuned-lens (AlignmentResearch/tuned-lens, `TunedLens.save`) writes `config.json` (the fields
of its `TunedLensConfig`: `base_model_name_or_path`, `d_model`, `num_hidden_layers`, `bias`,
`base_model_revision`, `unembed_hash`, `lens_type`) and `params.pt`, the state dict of its
`layer_translators` ModuleList: keys `"{i}.weight"` [d_model, d_model] and `"{i}.bias"` [d_model].
We read `params.pt` with `torch.load(weights_only=True)`, which refuses any pickle that would run
code, and also accept keys prefixed `layer_translators.` (a whole-module state dict). The
safetensors layout is the same `config.json` beside `params.safetensors` with the same keys.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn

from hookedcot.dictionaries.files import (DictionaryFileError, DictionaryFileNotFoundError, float_tensor, optional_type,
                                          positive_int, read_json_object, read_tensors)
from hookedcot.hook_names import get_act_name

LENS_TYPE = "linear_tuned_lens"
CONFIG_FIELDS = ("base_model_name_or_path", "d_model", "num_hidden_layers", "bias", "base_model_revision",
                 "unembed_hash", "lens_type")
FORMATS = {"tuned-lens": "params.pt", "safetensors": "params.safetensors"}


class TunedLens(nn.Module):
    """`n_layers` affine translators `h -> h + A_i h + b_i` (fp32, whatever the model's dtype)."""

    def __init__(self, d_model: int, n_layers: int, bias: bool = True, base_model_name_or_path: str = "",
                 base_model_revision: str | None = None, unembed_hash: str | None = None):
        super().__init__()
        self.config = {"base_model_name_or_path": base_model_name_or_path, "d_model": d_model,
                       "num_hidden_layers": n_layers, "bias": bias, "base_model_revision": base_model_revision,
                       "unembed_hash": unembed_hash, "lens_type": LENS_TYPE}
        self.layer_translators = nn.ModuleList(nn.Linear(d_model, d_model, bias=bias) for _ in range(n_layers))
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()

    @classmethod
    def zeros(cls, model: Any, bias: bool = True) -> "TunedLens":
        """An untrained lens for `model`: every translator is the identity (the logit lens)."""
        return cls(model.cfg.d_model, model.cfg.n_layers, bias=bias,
                   base_model_name_or_path=str(getattr(model.cfg, "name", "") or ""))

    @property
    def n_layers(self) -> int:
        return len(self.layer_translators)

    def transform(self, resid: Float[Tensor, "... d_model"], layer: int) -> Float[Tensor, "... d_model"]:
        """`h + A_layer h + b_layer` for the residual entering block `layer`, in the residual's dtype."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} has no translator; this lens has layers 0..{self.n_layers - 1}")
        translator = self.layer_translators[layer]
        h = resid.to(translator.weight.dtype)
        return (h + translator(h)).to(resid.dtype)

    def logits(self, model: Any, resid: Float[Tensor, "... pos d_model"], layer: int) -> Float[Tensor, "... pos d_vocab"]:
        """What the tuned lens reads from `blocks.{layer}.hook_resid_pre`: final norm, unembedding."""
        return model.unembed_resid(self.transform(resid, layer))

    @torch.no_grad()
    def kl_per_layer(self, model: Any, tokens: Int[Tensor, "batch pos"],
                     attention_mask: Tensor | None = None) -> dict[str, Tensor]:
        """Mean KL(final ‖ lens) over the (unmasked) positions, per layer, for this lens ("tuned") and
        the logit lens ("logit"): {"tuned": [n_layers], "logit": [n_layers]} in nats."""
        tokens = (tokens[None] if tokens.dim() == 1 else tokens).to(model.device)
        resid, final = _activations(model, tokens, attention_mask, self.n_layers)
        target = torch.log_softmax(model.unembed_resid(final).float(), dim=-1)
        out = {"tuned": torch.zeros(self.n_layers), "logit": torch.zeros(self.n_layers)}
        for layer in range(self.n_layers):
            out["logit"][layer] = _kl(target, model.unembed_resid(resid[:, layer])).mean()
            out["tuned"][layer] = _kl(target, self.logits(model, resid[:, layer], layer)).mean()
        return out

    def save(self, path: str | Path, format: str = "tuned-lens") -> Path:
        """A folder with `config.json` and `params.pt` ("tuned-lens", readable by tuned-lens'
        `TunedLens.from_unembed_and_pretrained`) or `params.safetensors` ("safetensors")."""
        if format not in FORMATS:
            raise ValueError(f"unknown tuned lens format {format!r}; choose from {list(FORMATS)}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.layer_translators.state_dict().items()}
        if format == "tuned-lens":
            torch.save(state, path / FORMATS[format])
        else:
            from safetensors.torch import save_file
            save_file(state, str(path / FORMATS[format]))
        (path / "config.json").write_text(json.dumps(self.config, indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TunedLens":
        """A lens saved by `save` or by tuned-lens (either layout; safetensors first when both exist).
        `params.pt` is read with `torch.load(weights_only=True)`: tensors only, never code. The
        files are untrusted: whatever is wrong with them is a `DictionaryFileError`, and every
        shape is checked against config.json before anything the size of config.json's numbers
        is allocated."""
        path = Path(path)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise DictionaryFileNotFoundError(f"{path} has no config.json; a tuned lens folder holds config.json and "
                                              "params.pt (tuned-lens' layout) or params.safetensors")
        config = read_json_object(cfg_path)
        if unknown := sorted(set(config) - set(CONFIG_FIELDS)):
            raise DictionaryFileError(f"{cfg_path} has fields this loader does not understand: {unknown}; "
                                      f"known fields: {list(CONFIG_FIELDS)}")
        if missing := [k for k in ("d_model", "num_hidden_layers") if k not in config]:
            raise DictionaryFileError(f"{cfg_path} lacks {missing}")
        if config.get("lens_type", LENS_TYPE) != LENS_TYPE:
            raise DictionaryFileError(f"{cfg_path}: lens_type {config['lens_type']!r} is not supported; only "
                                      f"{LENS_TYPE!r} (affine translators)")
        d_model, n_layers = positive_int(cfg_path, config, "d_model"), positive_int(cfg_path, config, "num_hidden_layers")
        bias = optional_type(cfg_path, config, "bias", (bool,))
        bias = True if bias is None else bias
        strings = {k: optional_type(cfg_path, config, k, (str,))
                   for k in ("base_model_name_or_path", "base_model_revision", "unembed_hash")}
        if (path / FORMATS["safetensors"]).is_file():
            state = read_tensors(path / FORMATS["safetensors"])
            source = path / FORMATS["safetensors"]
        elif (path / FORMATS["tuned-lens"]).is_file():
            source = path / FORMATS["tuned-lens"]
            try:
                state = torch.load(source, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - the unpickler's and zip reader's errors all mean "unreadable"
                raise DictionaryFileError(f"{source} cannot be read with torch.load(weights_only=True) "
                                          f"({type(exc).__name__}: {str(exc)[:300]}); re-save the lens") from None
        else:
            raise DictionaryFileNotFoundError(f"{path} has config.json but neither params.pt nor params.safetensors")
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
            raise DictionaryFileError(f"{source}: expected a state dict of named tensors, got {type(state).__name__}")
        state = {k.removeprefix("layer_translators."): v for k, v in state.items()}
        shapes = {f"{i}.weight": (d_model, d_model) for i in range(min(n_layers, len(state) + 1))}
        if bias:
            shapes.update({f"{i}.bias": (d_model,) for i in range(min(n_layers, len(state) + 1))})
        if len(state) != n_layers * (2 if bias else 1) or set(state) != set(shapes):
            raise DictionaryFileError(
                f"{source}: parameter keys do not match config.json (d_model={d_model}, num_hidden_layers={n_layers}, "
                f"bias={bias}); missing {sorted(set(shapes) - set(state))[:6]}, unexpected "
                f"{sorted(set(state) - set(shapes))[:6]}")
        if bad := {k: tuple(v.shape) for k, v in state.items() if tuple(v.shape) != shapes[k]}:
            raise DictionaryFileError(f"{source}: shapes {dict(list(bad.items())[:4])} do not fit d_model={d_model} "
                                      "of config.json")
        state = {k: float_tensor(source, k, v).float() for k, v in state.items()}
        lens = cls(d_model, n_layers, bias=bias, base_model_name_or_path=strings["base_model_name_or_path"] or "",
                   base_model_revision=strings["base_model_revision"], unembed_hash=strings["unembed_hash"])
        lens.layer_translators.load_state_dict(state)
        return lens


def train_tuned_lens(
    model: Any,
    data: str | Sequence[str] | Tensor | Sequence[Tensor],
    steps: int = 200,
    lr: float = 1e-3,
    seed: int = 0,
    tokens_per_step: int = 64,
    weight_decay: float = 1e-3,
    lens: TunedLens | None = None,
) -> tuple[TunedLens, list[float]]:
    """Fit a tuned lens to `model` on `data` (texts, or token ids [batch, pos] / a list of [pos]):
    each step samples `tokens_per_step` positions and minimises the mean over layers of
    KL(final ‖ lens_i) with Adam. Activations are recorded once, up front (n_tokens × n_layers ×
    d_model floats), so the steps cost only the translators and the unembedding. Returns the lens
    and the loss at each step (nats, averaged over layers). The model is left unchanged."""
    sequences = _sequences(model, data)
    lens = lens if lens is not None else TunedLens.zeros(model)
    lens = lens.to(model.device)
    with torch.no_grad():
        parts = [_activations(model, s[None], None, lens.n_layers) for s in sequences]
    resid = torch.cat([r for r, _ in parts]).float()  # [n_tokens, n_layers, d_model]
    final = torch.cat([f for _, f in parts])          # [n_tokens, d_model]
    del parts
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(lens.parameters(), lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    try:
        with torch.enable_grad():
            for _ in range(steps):
                index = torch.randint(0, resid.shape[0], (tokens_per_step,), generator=generator).to(resid.device)
                with torch.no_grad():
                    target = torch.log_softmax(model.unembed_resid(final[index]).float(), dim=-1)
                h = resid[index]
                loss = sum(_kl(target, lens.logits(model, h[:, layer].to(model.dtype), layer)).mean()
                           for layer in range(lens.n_layers)) / lens.n_layers
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
    finally:
        for p in frozen:
            p.requires_grad_(True)
    return lens, losses


def _kl(target_logp: Tensor, logits: Tensor) -> Tensor:
    """KL(target ‖ softmax(logits)) over the last axis, per position (fp32)."""
    logq = torch.log_softmax(logits.float(), dim=-1)
    return (target_logp.exp() * (target_logp - logq)).sum(-1)


def _activations(model: Any, tokens: Tensor, attention_mask: Tensor | None,
                 n_layers: int) -> tuple[Tensor, Tensor]:
    """The residual entering each block [n_tokens, n_layers, d_model] and the final residual
    [n_tokens, d_model] (before the final norm), at the unmasked positions."""
    if n_layers != model.cfg.n_layers:
        raise ValueError(f"this lens has {n_layers} translators but the model has {model.cfg.n_layers} layers")
    kept: dict[str, Tensor] = {}

    def keep(x: Tensor, hook: Any) -> None:
        kept[hook.name] = x.detach()

    names = [get_act_name("resid_pre", layer) for layer in range(n_layers)]
    final_name = get_act_name("resid_post", n_layers - 1)
    model.run_with_hooks(tokens, attention_mask=attention_mask, fwd_hooks=[(n, keep) for n in names + [final_name]])
    resid = torch.stack([kept[n] for n in names], dim=2)  # [batch, pos, n_layers, d_model]
    final = kept[final_name]
    if attention_mask is not None:
        mask = attention_mask.to(resid.device).bool()
        resid, final = resid[mask], final[mask]
    else:
        resid, final = resid.flatten(0, 1), final.flatten(0, 1)
    return resid, final


def _sequences(model: Any, data: str | Sequence[str] | Tensor | Sequence[Tensor]) -> list[Tensor]:
    if isinstance(data, str):
        data = [data]
    if isinstance(data, Tensor):
        if data.is_floating_point():
            raise TypeError("train_tuned_lens takes texts or token ids, got a float tensor")
        data = list(data[None] if data.dim() == 1 else data)
    out = []
    for item in data:
        if isinstance(item, str):
            out.append(model.to_tokens(item)[0])
        elif isinstance(item, Tensor) and not item.is_floating_point() and item.dim() == 1:
            out.append(item)
        else:
            raise TypeError(f"train_tuned_lens takes texts or token ids [pos], got {type(item).__name__}")
    if not out:
        raise ValueError("train_tuned_lens needs at least one text or token sequence")
    return [s.to(model.device) for s in out]
