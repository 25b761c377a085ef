"""What a crosscoder's latents are: per-latent statistics over an activation store and Latent
Scaling (Minder et al. 2025, arXiv 2504.02922).

`feature_stats(coder, store)`: mean activation, firing frequency, largest activation, decoder norms,
relative decoder norm (child / sum: base-only near 0, shared near 0.5, child-only near 1), a class,
and the top-activating contexts with their tokens. `latent_scaling(coder, store, features)`: how
much of a latent's child decoder direction each model's activations carry, telling genuinely
child-specific latents from Complete Shrinkage / Latent Decoupling artefacts of the training.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from hookedcot.dictionaries.crosscoder import CrossCoder, batch_acts, iter_batches

@dataclass
class Context:
    """One top-activating token: `tokens` is the window from `context` tokens before to 2 after,
    `index` the firing token's place in it."""

    sequence: int
    position: int
    activation: float
    tokens: list[int]
    index: int


@dataclass
class FeatureStats:
    """Per-latent statistics over a store's tokens (`feature_stats`). Tensors are [d_latent] unless
    said; `relative_norm` is ||d_1|| / (||d_0|| + ||d_1||) for two models (NaN otherwise)."""

    models: list[str]
    hook_name: str | None
    n_tokens: int
    mean_activation: Tensor
    frequency: Tensor
    max_activation: Tensor
    decoder_norms: Tensor  # [d_latent, n_models]
    relative_norm: Tensor
    classes: list[str]
    contexts: list[list[Context]]
    thresholds: tuple[float, float] = (0.1, 0.9)

    STATS = ("mean_activation", "frequency", "max_activation", "relative_norm")

    def top(self, n: int = 10, by: str = "mean_activation", cls: str | None = None, *,
            descending: bool = True) -> list[int]:
        """The `n` features with the largest (`descending=False`: smallest) `by` among those of class
        `cls` (e.g. "shared", "child-only", "dead"; None: all)."""
        if by not in self.STATS:
            raise ValueError(f"unknown statistic {by!r}; choose from {list(self.STATS)}")
        known = set(self.classes) | {"shared", "dead", *(f"{m}-only" for m in self.models)}
        if cls is not None and cls not in known:
            raise ValueError(f"unknown feature class {cls!r}; classes are {sorted(known)}")
        values = getattr(self, by).double().nan_to_num(nan=-math.inf if descending else math.inf)
        order = values.argsort(descending=descending, stable=True).tolist()
        return [j for j in order if cls is None or self.classes[j] == cls][:n]

    def to_rows(self) -> list[dict[str, Any]]:
        rows = []
        for j in range(len(self.classes)):
            row = {"feature": j, "class": self.classes[j], "mean_activation": float(self.mean_activation[j]),
                   "frequency": float(self.frequency[j]), "max_activation": float(self.max_activation[j]),
                   "relative_norm": float(self.relative_norm[j])}
            row.update({f"decoder_norm_{m}": float(self.decoder_norms[j, i]) for i, m in enumerate(self.models)})
            rows.append(row)
        return rows

    def to_pandas(self) -> Any:
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("FeatureStats.to_pandas needs pandas (pip install pandas); "
                              "to_rows() gives plain dicts") from None
        return pd.DataFrame(self.to_rows()).set_index("feature")

    def save(self, path: str | Path) -> Path:
        """JSON: the statistics as lists, the contexts as dicts."""
        data = {"models": self.models, "hook_name": self.hook_name, "n_tokens": self.n_tokens,
                "thresholds": list(self.thresholds), "classes": self.classes,
                **{name: getattr(self, name).tolist() for name in (*self.STATS, "decoder_norms")},
                "contexts": [[asdict(c) for c in cs] for cs in self.contexts]}
        path = Path(path)
        path.write_text(json.dumps(data, allow_nan=True))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "FeatureStats":
        data = json.loads(Path(path).read_text())
        tensors = {name: torch.tensor(data[name], dtype=torch.float32) for name in (*cls.STATS, "decoder_norms")}
        return cls(models=data["models"], hook_name=data["hook_name"], n_tokens=data["n_tokens"],
                   classes=data["classes"],
                   contexts=[[Context(**c) for c in cs] for cs in data["contexts"]],
                   thresholds=tuple(data["thresholds"]), **tensors)

    def describe(self, feature: int, tokenizer_or_model: Any) -> str:
        """A header line and one line per top context, the firing token marked `[[token]]`."""
        decode = getattr(tokenizer_or_model, "to_string", None) or tokenizer_or_model.decode
        lines = [f"feature {feature} ({self.classes[feature]}): mean {float(self.mean_activation[feature]):.4g}, "
                 f"frequency {float(self.frequency[feature]):.4g}, "
                 f"relative norm {float(self.relative_norm[feature]):.3f}"]
        for c in self.contexts[feature]:
            before, token, after = c.tokens[:c.index], c.tokens[c.index], c.tokens[c.index + 1:]
            text = (decode(before) if before else "") + f"[[{decode([token])}]]" + (decode(after) if after else "")
            lines.append(f"  {c.activation:8.3f}  seq {c.sequence} pos {c.position}: {text!r}")
        return "\n".join(lines)


def classify(relative_norm: Tensor, frequency: Tensor, models: list[str],
             thresholds: tuple[float, float] = (0.1, 0.9)) -> list[str]:
    """"dead" (never fired), "<models[0]>-only" (relative norm below thresholds[0]), "<models[1]>-only"
    (above thresholds[1]), else "shared". With more than two models: "dead" or "shared"."""
    low, high = thresholds
    out = []
    for rel, freq in zip(relative_norm.tolist(), frequency.tolist()):
        if freq == 0:
            out.append("dead")
        elif len(models) == 2 and rel < low:
            out.append(f"{models[0]}-only")
        elif len(models) == 2 and rel > high:
            out.append(f"{models[1]}-only")
        else:
            out.append("shared")
    return out


@torch.no_grad()
def feature_stats(coder: CrossCoder, store: Any, hook_name: str | None = None, *, max_tokens: int = 1_000_000,
                  top_k: int = 10, context: int = 8, batch_size: int = 1024,
                  thresholds: tuple[float, float] = (0.1, 0.9)) -> FeatureStats:
    """Statistics of every latent over the store's first `max_tokens` tokens (read in order, raw
    scale; the coder applies its own input scale): mean activation, firing frequency, largest
    activation, decoder norms, relative decoder norm, class (`classify`, by `thresholds`), and the
    `top_k` highest-activating tokens with their windows (`store.sequence_tokens`)."""
    hook_name = hook_name or coder.hook_name
    device = coder.W_enc.device
    total = torch.zeros(coder.d_latent, dtype=torch.float64)
    fired = torch.zeros(coder.d_latent, dtype=torch.float64)
    best = torch.zeros(coder.d_latent, 0)
    where = torch.zeros(coder.d_latent, 0, 2, dtype=torch.long)  # (sequence, position)
    n = 0
    for batch in iter_batches(store, hook_name, batch_size):
        take = min(batch.acts.shape[0], max_tokens - n)
        if take <= 0:
            break
        f = coder.encode(batch.acts[:take].to(device)).float().cpu()  # [B, d_latent]
        total += f.double().sum(0)
        fired += (f > 0).double().sum(0)
        ids = torch.stack([batch.sequences[:take], batch.positions[:take]], -1).long()  # [B, 2]
        batch_best, batch_idx = f.T.topk(min(top_k, take), dim=1)  # this batch's top per latent
        values, places = torch.cat([best, batch_best], 1), torch.cat([where, ids[batch_idx]], 1)
        best, idx = values.topk(min(top_k, values.shape[1]), dim=1)
        where = places.gather(1, idx[..., None].expand(-1, -1, 2))
        n += take
    if n == 0:
        raise ValueError(f"the store gave no tokens for {hook_name!r}")
    norms = coder.decoder_norms().float().cpu()
    relative = (norms[:, 1] / (norms[:, 0] + norms[:, 1]) if coder.n_models == 2
                else torch.full((coder.d_latent,), math.nan))
    frequency = (fired / n).float()
    tokens_of: dict[int, Tensor] = {}
    contexts = []
    for j in range(coder.d_latent):
        found = []
        for value, (seq, pos) in zip(best[j].tolist(), where[j].tolist()):
            if value <= 0:
                break
            if seq not in tokens_of:
                tokens_of[seq] = store.sequence_tokens(seq)
            lo = max(pos - context, 0)
            found.append(Context(seq, pos, value, tokens_of[seq][lo:pos + 3].tolist(), pos - lo))
        contexts.append(found)
    return FeatureStats(models=list(coder.models), hook_name=hook_name, n_tokens=n, mean_activation=(total / n).float(),
                        frequency=frequency,
                        max_activation=best[:, 0] if best.shape[1] else torch.zeros(coder.d_latent),
                        decoder_norms=norms, relative_norm=relative,
                        classes=classify(relative, frequency, coder.models, thresholds), contexts=contexts,
                        thresholds=tuple(thresholds))


@dataclass
class LatentScaling:
    """`latent_scaling`'s result, per feature in `features` order. `beta_error` / `beta_reconstruction`:
    [n_features, n_models]; `nu_error` / `nu_reconstruction`: beta[base] / beta[child]; `count`:
    tokens on which the latent fired."""

    features: list[int]
    models: list[str]
    base: str
    child: str
    beta_error: Tensor
    beta_reconstruction: Tensor
    nu_error: Tensor
    nu_reconstruction: Tensor
    count: Tensor

    def flags(self, threshold: float = 0.3, reconstruction_threshold: float | None = None) -> list[str]:
        """Per feature: "complete shrinkage" (nu_error > threshold: the latent also explains the base
        model's error, its base decoder was shrunk away), "latent decoupling" (nu_reconstruction >
        reconstruction_threshold, default `threshold`: the base reconstruction carries it through
        other latents), both joined by ", ", "<child>-specific" when neither, or "inactive" when the
        latent never fired (NaN). Meant for latents that look child-only by their decoder norms: a
        shared latent has both ratios near 1 anyway."""
        r_thr = threshold if reconstruction_threshold is None else reconstruction_threshold
        out = []
        for e, r in zip(self.nu_error.tolist(), self.nu_reconstruction.tolist()):
            if math.isnan(e) or math.isnan(r):
                out.append("inactive")
                continue
            hits = (("complete shrinkage", e > threshold), ("latent decoupling", r > r_thr))
            found = [name for name, hit in hits if hit]
            out.append(", ".join(found) or f"{self.child}-specific")
        return out


@torch.no_grad()
def latent_scaling(coder: CrossCoder, store_or_batches: Any, features: Iterable[int], *, hook_name: str | None = None,
                   max_tokens: int = 1_000_000, base: int | str = 0, child: int | str = -1,
                   batch_size: int = 1024) -> LatentScaling:
    """Latent Scaling (Minder et al. 2025, arXiv 2504.02922): how much of latent j's child decoder
    direction each model's activations actually carry.

    In the coder's normalised space (x_m = s_m * raw_m, where the decoder lives), with f_j(x) the
    joint latent, d_j = W_dec[j, child] the child's decoder direction, d_j^m = W_dec[j, m] model m's,
    and x_hat_m = f @ W_dec[:, m] + b_dec[m] the reconstruction, fit for each model m and target y:

        beta = argmin_b sum_x ||b f_j(x) d_j - y(x)||^2 = sum_x f_j(x) <d_j, y(x)> / (||d_j||^2 sum_x f_j(x)^2)

    with the targets of the paper's code (science-of-finetuning/sparsity-artifacts-crosscoders):
    - error: y = x_m - (x_hat_m - f_j d_j^m), the reconstruction error with latent j's own
      contribution to model m added back (what latent j could explain of model m);
    - reconstruction: y = x_hat_m, the full reconstruction (all latents, decoder bias included).

    `nu_error = beta_error[base] / beta_error[child]` and `nu_reconstruction` likewise. A latent
    that is genuinely child-only has both near 0; nu_error near 1 means the base model's
    activations carry the direction as strongly (Complete Shrinkage: the L1 loss shrank its base
    decoder to zero); nu_reconstruction near 1 means other latents rebuild it in the base
    reconstruction (Latent Decoupling). The sums run over the first `max_tokens` tokens of the
    store (in order, raw scale) or of the given batches."""
    features = [int(j) for j in features]
    b_idx, c_idx = coder.model_index(base), coder.model_index(child)
    device = coder.W_enc.device
    chosen = coder.W_dec.detach()[features].double()              # [F, M, D]
    d = chosen[:, c_idx]                                          # [F, D]
    self_overlap = torch.einsum("fd,fmd->fm", d, chosen)          # <d_j, d_j^m>
    num_err = torch.zeros(len(features), coder.n_models, dtype=torch.float64, device=device)
    num_rec = torch.zeros_like(num_err)
    f_sq = torch.zeros(len(features), dtype=torch.float64, device=device)
    count = torch.zeros(len(features), dtype=torch.float64, device=device)
    n = 0
    for batch in iter_batches(store_or_batches, hook_name or coder.hook_name, batch_size):
        x_raw = batch_acts(batch)
        take = min(x_raw.shape[0], max_tokens - n)
        if take <= 0:
            break
        x_raw = x_raw[:take].to(device)
        f = coder.encode(x_raw)                                   # [B, L]
        x = x_raw.double() * coder.input_scale.double()[:, None]  # [B, M, D] normalised
        recon = (torch.einsum("bl,lmd->bmd", f, coder.W_dec) + coder.b_dec).double()
        fj = f[:, features].double()                              # [B, F]
        along_rec = torch.einsum("bmd,fd->bmf", recon, d)         # <d_j, x_hat_m>
        along_err = torch.einsum("bmd,fd->bmf", x - recon, d)     # <d_j, x_m - x_hat_m>
        num_rec += torch.einsum("bf,bmf->fm", fj, along_rec)
        num_err += torch.einsum("bf,bmf->fm", fj, along_err) + fj.pow(2).sum(0)[:, None] * self_overlap
        f_sq += fj.pow(2).sum(0)
        count += (fj > 0).double().sum(0)
        n += take
    if n == 0:
        raise ValueError("latent_scaling got no activations")
    denom = (f_sq * d.pow(2).sum(-1))[:, None]
    beta_err = (num_err / denom).float().cpu()  # 0/0 -> NaN for a latent that never fired
    beta_rec = (num_rec / denom).float().cpu()
    return LatentScaling(features=features, models=list(coder.models), base=coder.models[b_idx],
                         child=coder.models[c_idx], beta_error=beta_err, beta_reconstruction=beta_rec,
                         nu_error=beta_err[:, b_idx] / beta_err[:, c_idx],
                         nu_reconstruction=beta_rec[:, b_idx] / beta_rec[:, c_idx], count=count.cpu())
