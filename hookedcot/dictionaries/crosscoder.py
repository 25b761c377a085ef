"""Crosscoders for model diffing: one sparse latent space read from several models' activations at
one hook (e.g. a base model and its chat / reasoning child), one decoder per model.

    coder, log = train_crosscoder(store, hook_name="blocks.6.hook_resid_post", d_latent=4096,
                                  architecture="batchtopk", k=32, steps=20_000, checkpoint_dir="cc")
    stats = feature_stats(coder, store)               # frequency, decoder norms, classes, top contexts
    stats.top(10, cls="child-only"); print(stats.describe(123, model))
    scaling = latent_scaling(coder, store, stats.top(50, cls="child-only"))   # Minder et al. 2025
    with model.hooks([coder.hook("child", FeatureEdit("zero", [123]))]): ...  # splice into one model

Shapes: `x` [..., n_models, d_in] (models in `coder.models` order), latents [..., d_latent].
Encoder: `f = act(sum_m (s_m x_m) @ W_enc[m] + b_enc)`, with `s = input_scale` (the activation
store's normalisation, so that the mean activation norm is sqrt(d_in)); decoder: `x_m ~ (f @ W_dec[:, m]
+ b_dec[m]) / s_m`. `act` is ReLU ("l1") or, for "batchtopk", during training the k*B largest
values of `relu(pre) * sum_m ||W_dec[j, m]||` over a batch of B tokens (k per token on average, the
BatchTopK crosscoder of Minder et al.; selecting on the decoder-norm-weighted value makes the choice
independent of how the norm is split between encoder and decoder) and at inference the same value
compared with `threshold`, the running mean of the smallest value kept in each training batch
(Bussmann et al. 2024).

The *single-model view* `encode(x_m, model=m)` is the latent as model m alone drives it: the other
models' encoder terms are left out (`act(s_m x_m @ W_enc[m] + b_enc)`). This is what a hook sees
while one model runs, and it equals the joint latent when the other models' inputs are zero. For a
feature shared by both models it is usually close to the joint latent; for a feature one model
lacks it is what that model alone would contribute.

Files (`save(folder)`): `crosscoder.safetensors` (W_enc [n_models, d_in, d_latent], b_enc
[d_latent], W_dec [d_latent, n_models, d_in], b_dec [n_models, d_in], input_scale [n_models]) and
`config.json` (format, architecture, k, threshold, d_in, d_latent, models, hook_name, l1_coeff,
training). `CrossCoder.load(folder)` reads them back.

Analysis lives in `feature_analysis.py`: `feature_stats` (per latent: mean activation, firing frequency, decoder norms, relative
decoder norm and a class, top-activating contexts) and `latent_scaling` (Minder et al.'s closed-form
fit telling genuinely child-specific latents from Complete Shrinkage / Latent Decoupling artefacts).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from jaxtyping import Float
from safetensors.torch import save_file
from torch import Tensor, nn

from hookedcot.dictionaries.files import (DictionaryFileError, DictionaryFileNotFoundError, float_tensor, optional_type,
                                          positive_int, read_json_object, read_tensors)
from hookedcot.dictionaries.sae import FeatureEdit

ARCHITECTURES = ("l1", "batchtopk")
WEIGHTS, CONFIG = "crosscoder.safetensors", "config.json"
FORMAT = 1
THRESHOLD_DECAY = 0.99  # running mean of the batch's smallest kept value (batchtopk)
AUX_COEFF = 1 / 32      # weight of the dead-latent auxiliary loss (batchtopk), as in Gao et al. 2024


class CrossCoder(nn.Module):
    """encode: [..., n_models, d_in] -> [..., d_latent]; decode: [..., d_latent] -> [..., n_models, d_in]
    (module docstring). `model=` (an index or a name in `models`) selects one model's view."""

    def __init__(self, W_enc: Tensor, b_enc: Tensor, W_dec: Tensor, b_dec: Tensor, *, input_scale: Tensor | None = None,
                 architecture: str = "l1", k: int | None = None, threshold: float | None = None,
                 models: list[str] | None = None, hook_name: str | None = None, l1_coeff: float | None = None,
                 training: dict[str, Any] | None = None):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"unknown crosscoder architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}")
        if W_enc.dim() != 3:
            raise ValueError(f"W_enc must be [n_models, d_in, d_latent], got shape {tuple(W_enc.shape)}")
        n_models, d_in, d_latent = W_enc.shape
        input_scale = torch.ones(n_models) if input_scale is None else torch.as_tensor(input_scale, dtype=torch.float32)
        expected = {"b_enc": (d_latent,), "W_dec": (d_latent, n_models, d_in), "b_dec": (n_models, d_in),
                    "input_scale": (n_models,)}
        got = {"b_enc": b_enc.shape, "W_dec": W_dec.shape, "b_dec": b_dec.shape, "input_scale": input_scale.shape}
        if bad := {n: tuple(s) for n, s in got.items() if tuple(s) != expected[n]}:
            raise ValueError(f"crosscoder tensor shapes {bad} do not fit W_enc {tuple(W_enc.shape)} [n_models, d_in, "
                             f"d_latent]; expected {{{', '.join(f'{n}: {expected[n]}' for n in bad)}}}")
        models = list(models) if models is not None else [f"model{i}" for i in range(n_models)]
        if len(models) != n_models:
            raise ValueError(f"{len(models)} model names {models} for a crosscoder of {n_models} models")
        if architecture == "batchtopk" and not k:
            raise ValueError("a BatchTopK crosscoder needs k (latents kept per token, on average over a batch)")
        self.W_enc, self.b_enc = nn.Parameter(W_enc, requires_grad=False), nn.Parameter(b_enc, requires_grad=False)
        self.W_dec, self.b_dec = nn.Parameter(W_dec, requires_grad=False), nn.Parameter(b_dec, requires_grad=False)
        self.register_buffer("input_scale", input_scale.to(W_enc.dtype))
        self.architecture, self.k, self.threshold = architecture, k, threshold
        self.models, self.hook_name, self.l1_coeff = models, hook_name, l1_coeff
        self.training_meta = dict(training or {})
        self.n_models, self.d_in, self.d_latent = n_models, d_in, d_latent

    @classmethod
    def init(cls, d_in: int, d_latent: int, models: list[str] | int = 2, *, seed: int = 0, decoder_norm: float = 0.1,
             **kwargs: Any) -> "CrossCoder":
        """Random unit-ish directions: each W_dec[j, m] has norm `decoder_norm`, W_enc its transpose
        (the crosscoder paper's init), biases zero."""
        names = [f"model{i}" for i in range(models)] if isinstance(models, int) else list(models)
        g = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(d_latent, len(names), d_in, generator=g)
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True) * decoder_norm
        return cls(W_dec.permute(1, 2, 0).contiguous(), torch.zeros(d_latent), W_dec,
                   torch.zeros(len(names), d_in), models=names, **kwargs)

    def model_index(self, model: int | str) -> int:
        if isinstance(model, str):
            if model not in self.models:
                raise KeyError(f"no model {model!r} in this crosscoder; its models are {self.models}")
            return self.models.index(model)
        if not -self.n_models <= model < self.n_models:
            raise IndexError(f"model index {model} out of range for {self.n_models} models {self.models}")
        return model % self.n_models

    # ------------------------------------------------------------------------------ encode / decode
    def pre_activations(self, x: Tensor, model: int | str | None = None) -> Tensor:
        """`sum_m (s_m x_m) @ W_enc[m] + b_enc` (or model m's term alone), before the activation."""
        x = x.to(self.W_enc.dtype)
        if model is not None:
            m = self.model_index(model)
            return (x * self.input_scale[m]) @ self.W_enc[m] + self.b_enc
        if x.shape[-2:] != (self.n_models, self.d_in):
            raise ValueError(f"crosscoder input must be [..., n_models={self.n_models}, d_in={self.d_in}], got "
                             f"{tuple(x.shape)}; for one model's activations pass model=")
        pre = (x[..., 0, :] * self.input_scale[0]) @ self.W_enc[0]
        for m in range(1, self.n_models):
            pre = pre + (x[..., m, :] * self.input_scale[m]) @ self.W_enc[m]
        return pre + self.b_enc

    def activate(self, pre: Tensor, *, batch_topk: bool = False) -> Tensor:
        """ReLU ("l1"); "batchtopk": the k*B largest decoder-norm-weighted values over the batch
        (`batch_topk=True`, training) or those above `threshold` (inference; per-token top-k while
        no threshold has been estimated)."""
        f = pre.relu()
        if self.architecture == "l1":
            return f
        value = f * self.W_dec.norm(dim=-1).sum(-1)
        if batch_topk:
            flat = value.reshape(-1)
            n = min(self.k * max(flat.numel() // self.d_latent, 1), flat.numel())
            kept = torch.zeros_like(flat, dtype=torch.bool).scatter(0, flat.topk(n).indices, True)
            return f * (kept.view_as(f) & (value > 0))
        if self.threshold is None:
            idx = value.topk(min(self.k, self.d_latent), dim=-1).indices
            return f * torch.zeros_like(f, dtype=torch.bool).scatter(-1, idx, True)
        return f * (value > self.threshold)

    def encode(self, x: Tensor, model: int | str | None = None) -> Float[Tensor, "... d_latent"]:
        """Joint latent of x [..., n_models, d_in]; with `model=m`, the single-model view of
        x [..., d_in] (model m's encoder term alone; module docstring). Raw-scale inputs."""
        return self.activate(self.pre_activations(x, model))

    def decode(self, f: Float[Tensor, "... d_latent"], model: int | str | None = None) -> Tensor:
        """Raw-scale reconstruction [..., n_models, d_in], or model m's [..., d_in]."""
        if model is not None:
            m = self.model_index(model)
            return (f @ self.W_dec[:, m] + self.b_dec[m]) / self.input_scale[m]
        out = torch.einsum("...l,lmd->...md", f, self.W_dec) + self.b_dec
        return out / self.input_scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def decoder_norms(self) -> Tensor:
        """||W_dec[j, m]|| [d_latent, n_models] (in the normalised space the decoder lives in)."""
        return self.W_dec.detach().norm(dim=-1)

    def hook(self, model: int | str, edit: FeatureEdit | Callable[[Tensor, Any], Tensor] | None = None, *,
             error: bool = True, hook_name: str | None = None) -> tuple[str, Callable]:
        """`(hook name, hook function)` splicing this crosscoder into `model` (a name in `models` or
        an index) while that model runs: encode its activation in the single-model view, `edit(features,
        hook)`, decode with its decoder, write back. With `error=True` the hook writes
        `x + (decode_m(edited) - decode_m(features))`, which is `x` bit for bit when the edit changes
        nothing; `error=False` writes the reconstruction alone (as `SAE.hook`)."""
        m = self.model_index(model)
        name = hook_name or self.hook_name
        if name is None:
            raise ValueError("this crosscoder does not know its hook name: pass hook_name= "
                             "(e.g. 'blocks.6.hook_resid_post')")

        def splice(x: Tensor, hook: Any) -> Tensor:
            features = self.encode(x, model=m)
            edited = features if edit is None else edit(features, hook)
            if not error:
                return self.decode(edited, model=m).to(x.dtype)
            return x + (self.decode(edited, model=m) - self.decode(features, model=m)).to(x.dtype)

        return name, splice

    # ---------------------------------------------------------------------------------- save / load
    def config(self) -> dict[str, Any]:
        return {"format": FORMAT, "architecture": self.architecture, "k": self.k, "threshold": self.threshold,
                "d_in": self.d_in, "d_latent": self.d_latent, "models": self.models, "hook_name": self.hook_name,
                "l1_coeff": self.l1_coeff, "training": self.training_meta}

    def save(self, folder: str | Path) -> Path:
        """`crosscoder.safetensors` + `config.json` (module docstring)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec,
                   "input_scale": self.input_scale}
        save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, folder / WEIGHTS)
        (folder / CONFIG).write_text(json.dumps(self.config(), indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, device: Any = None, dtype: Any = None) -> "CrossCoder":
        """A folder written by `save`. The files are untrusted: whatever is wrong with them (JSON,
        types, shapes against the config, non-finite weights) is a `DictionaryFileError`."""
        folder = Path(folder)
        for name in (CONFIG, WEIGHTS):
            if not (folder / name).is_file():
                raise DictionaryFileNotFoundError(f"{folder / name} not found; a crosscoder folder holds {CONFIG} and "
                                                  f"{WEIGHTS} (written by CrossCoder.save)")
        cfg_path, weights_path = folder / CONFIG, folder / WEIGHTS
        cfg = read_json_object(cfg_path)
        if (fmt := positive_int(cfg_path, cfg, "format", required=False) or FORMAT) > FORMAT:
            raise DictionaryFileError(f"{cfg_path} has format {fmt}; this hookedcot reads formats up to "
                                      f"{FORMAT}: upgrade hookedcot")
        models = cfg.get("models")
        if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models) \
                or len(set(models)) != len(models):
            raise DictionaryFileError(f"{cfg_path}: 'models' must be a list of distinct model names, got {models!r}")
        d_in, d_latent = positive_int(cfg_path, cfg, "d_in"), positive_int(cfg_path, cfg, "d_latent")
        architecture = cfg.get("architecture")
        if architecture not in ARCHITECTURES:
            raise DictionaryFileError(f"{cfg_path}: architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        k = positive_int(cfg_path, cfg, "k", required=False)
        threshold = optional_type(cfg_path, cfg, "threshold", (int, float))
        hook_name = optional_type(cfg_path, cfg, "hook_name", (str,))
        l1_coeff = optional_type(cfg_path, cfg, "l1_coeff", (int, float))
        training = optional_type(cfg_path, cfg, "training", (dict,))
        w = read_tensors(weights_path)
        if missing := sorted({"W_enc", "b_enc", "W_dec", "b_dec"} - set(w)):
            raise DictionaryFileError(f"{weights_path} lacks {missing}; expected W_enc, b_enc, W_dec, b_dec, "
                                      f"input_scale; found {sorted(w)}")
        n_models = len(models)
        if tuple(w["W_enc"].shape) != (n_models, d_in, d_latent):
            raise DictionaryFileError(f"{weights_path}: W_enc has shape {tuple(w['W_enc'].shape)} but {CONFIG} says "
                                      f"[n_models, d_in, d_latent] = {[n_models, d_in, d_latent]}")
        tensors = {n: float_tensor(weights_path, n, w[n]) for n in ("W_enc", "b_enc", "W_dec", "b_dec", "input_scale")
                   if n in w}
        if "input_scale" in tensors and not bool((tensors["input_scale"] > 0).all()):
            raise DictionaryFileError(f"{weights_path}: input_scale must be positive, got {tensors['input_scale'].tolist()}")
        dtypes = {t.dtype for t in tensors.values()}
        if len(dtypes) > 1:
            raise DictionaryFileError(f"{weights_path}: the tensors mix dtypes {sorted(map(str, dtypes))}; re-save it")
        try:
            coder = cls(tensors["W_enc"], tensors["b_enc"], tensors["W_dec"], tensors["b_dec"],
                        input_scale=tensors.get("input_scale"), architecture=architecture, k=k, threshold=threshold,
                        models=models, hook_name=hook_name, l1_coeff=l1_coeff, training=training)
        except ValueError as e:
            raise DictionaryFileError(f"{weights_path}: {e}") from None
        return coder.to(device=device, dtype=dtype) if (device or dtype) else coder

    def __repr__(self) -> str:
        return (f"CrossCoder({self.architecture}, models {self.models}, d_in {self.d_in}, d_latent {self.d_latent}"
                + (f", k {self.k}" if self.k else "") + f", hook {self.hook_name!r})")


# ------------------------------------------------------------------------------------------ training
@dataclass
class TrainingLog:
    """Per-step loss (total), mse (reconstruction, summed over models and dims, mean over tokens),
    sparsity (L0: latents active per token) and seconds since the start."""

    loss: list[float] = field(default_factory=list)
    mse: list[float] = field(default_factory=list)
    sparsity: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.loss)

    def plot(self, path: str | Path) -> Path:
        """A PNG of loss and MSE (log scale) and L0 against the step (matplotlib, Agg; no pyplot)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(9, 3.2))
        FigureCanvasAgg(fig)
        ax, ax0 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
        steps = range(1, len(self) + 1)
        ax.plot(steps, self.loss, label="loss", lw=0.8)
        ax.plot(steps, self.mse, label="mse", lw=0.8)
        ax.set_yscale("log"), ax.set_xlabel("step"), ax.legend()
        ax0.plot(steps, self.sparsity, lw=0.8, color="C2")
        ax0.set_xlabel("step"), ax0.set_ylabel("L0 (latents per token)")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=100)
        return path


def train_crosscoder(batches: Any, *, d_latent: int, architecture: str = "l1", l1_coeff: float = 1.0,
                     k: int = 32, lr: float = 1e-3, steps: int = 1000, batch_size: int = 1024, seed: int = 0,
                     models: list[str] | None = None, hook_name: str | None = None, input_scale: Any = None,
                     checkpoint_dir: str | Path | None = None, checkpoint_every: int = 1000, resume: bool = True,
                     plot: str | Path | None = None, progress: bool = True, device: Any = None
                     ) -> tuple[CrossCoder, TrainingLog]:
    """Train a crosscoder with Adam on `batches`: an iterable of [B, n_models, d_in] tensors (or of
    objects with `.acts`), or an activation store with `hook_name` (then `store.batches(hook_name,
    batch_size, shuffle=True, seed=seed, epochs=None)`, `input_scale=store.scale(hook_name)`,
    `models=store.models`). A re-iterable (a list) is cycled; an iterator that runs out ends training.

    Loss: "l1": MSE (summed over models and dims, mean over tokens, in the normalised space) +
    l1_coeff * sum_j f_j * sum_m ||W_dec[j, m]|| (warmed up linearly over the first 5% of steps);
    "batchtopk": k latents per token on average, MSE + 1/32 * AuxK (Gao et al. 2024: latents silent
    for max(steps / 50, 20) steps are dead, and their top d_in / 2 reconstruct the residual), no L1.
    The learning rate decays linearly to 0 over the last 20% of steps. Training runs on `device`
    (default: where the batches are). Same seed and data -> same weights, bit for bit, on CPU.

    Checkpoints (`checkpoint_dir`, every `checkpoint_every` steps and at the end): `step_XXXXXXXX.pt`
    with weights, optimizer, step, threshold and log. With `resume=True` training continues from the
    latest one, skipping the batches already used (pass the same data source again)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown crosscoder architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}")
    source, input_scale, models, hook_name = _training_source(batches, batch_size, seed, models, hook_name, input_scale)
    first = next(source, None)
    if first is None:
        raise ValueError("train_crosscoder got no batches")
    n_models, d_in = first.shape[1:]
    coder = CrossCoder.init(d_in, d_latent, models if models is not None else n_models, seed=seed,
                            input_scale=input_scale, architecture=architecture, hook_name=hook_name,
                            k=k if architecture == "batchtopk" else None,
                            l1_coeff=l1_coeff if architecture == "l1" else None)
    device = torch.device(device) if device is not None else first.device
    coder = coder.to(device).requires_grad_(True)
    optimizer = torch.optim.Adam(coder.parameters(), lr=lr, betas=(0.9, 0.999))
    log, start, state = TrainingLog(), 0, {}
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if ckpt is not None and resume and (latest := _latest_checkpoint(ckpt)) is not None:
        state = torch.load(latest, map_location="cpu", weights_only=True)
        _check_resumable(latest, state, coder, lr=lr, steps=steps, seed=seed, batch_size=int(first.shape[0]))
        coder.load_state_dict(state["coder"])
        optimizer.load_state_dict(state["optimizer"])
        coder.threshold, start, log = state["threshold"], state["step"], TrainingLog(**state["log"])
        for _ in range(start):  # the batches the checkpointed run has used
            first = next(source, None)
    coder.training_meta = {"steps": steps, "lr": lr, "seed": seed,
                           "batch_size": int(first.shape[0]) if first is not None else None}
    t0 = time.perf_counter() - (log.seconds[-1] if log.seconds else 0.0)
    batch, report = first, max(steps // 10, 1)
    since_fired = state["since_fired"].to(device) if start and "since_fired" in state else \
        torch.zeros(d_latent, dtype=torch.long, device=device)
    dead_after = max(steps // 50, 20)
    with torch.enable_grad():
        for step in range(start, steps):
            if batch is None:
                break
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, (steps - step) / max(0.2 * steps, 1))
            batch = batch.to(device)
            x = batch.to(coder.W_enc.dtype) * coder.input_scale[:, None]  # normalised space
            pre = coder.pre_activations(batch)
            f = coder.activate(pre, batch_topk=True)
            recon = torch.einsum("bl,lmd->bmd", f, coder.W_dec) + coder.b_dec
            mse = (recon - x).pow(2).sum((-1, -2)).mean()
            loss = mse
            if architecture == "batchtopk":
                since_fired = torch.where((f > 0).any(0), 0, since_fired + 1)
                loss = mse + AUX_COEFF * _aux_loss(coder, pre, x - recon.detach(), since_fired > dead_after)
            if architecture == "l1":
                warm = min(1.0, (step + 1) / max(0.05 * steps, 1))
                loss = mse + warm * l1_coeff * (f * coder.W_dec.norm(dim=-1).sum(-1)).sum(-1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if architecture == "batchtopk":
                _update_threshold(coder, f.detach())
            log.loss.append(loss.item()), log.mse.append(mse.item())
            log.sparsity.append((f > 0).sum(-1).float().mean().item()), log.seconds.append(time.perf_counter() - t0)
            if progress and ((step + 1) % report == 0 or step + 1 == steps):
                print(f"crosscoder step {step + 1}/{steps}: loss {log.loss[-1]:.4g}, mse {log.mse[-1]:.4g}, "
                      f"L0 {log.sparsity[-1]:.1f}", flush=True)
            if ckpt is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
                _save_checkpoint(ckpt, coder, optimizer, step + 1, log, since_fired)
            batch = next(source, None) if step + 1 < steps else None
    if plot is not None:
        log.plot(plot)
    return coder.requires_grad_(False), log


def _aux_loss(coder: CrossCoder, pre: Tensor, residual: Tensor, dead: Tensor) -> Tensor:
    """AuxK (Gao et al. 2024): the dead latents' top-k_aux (k_aux = d_in / 2) reconstruct what the
    live ones missed, so that dead latents get a gradient toward the unexplained directions."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    masked = torch.where(dead, pre.relu(), torch.zeros_like(pre))
    values, idx = masked.topk(min(max(coder.d_in // 2, 1), n_dead), dim=-1)
    f = torch.zeros_like(pre).scatter(-1, idx, values)
    return (torch.einsum("bl,lmd->bmd", f, coder.W_dec) - residual).pow(2).sum((-1, -2)).mean()


def _update_threshold(coder: CrossCoder, f: Tensor) -> None:
    """Running mean (EMA) of the smallest decoder-norm-weighted value kept in the batch."""
    value = (f * coder.W_dec.detach().norm(dim=-1).sum(-1))[f > 0]
    if value.numel():
        smallest = value.min().item()
        coder.threshold = smallest if coder.threshold is None else \
            THRESHOLD_DECAY * coder.threshold + (1 - THRESHOLD_DECAY) * smallest


def _training_source(batches: Any, batch_size: int, seed: int, models: list[str] | None, hook_name: str | None,
                     input_scale: Any) -> tuple[Iterator[Tensor], Tensor | None, list[str] | None, str | None]:
    if _is_store(batches):
        if hook_name is None:
            raise ValueError(f"training on an activation store needs hook_name= (one of {batches.hook_names})")
        stream = batches.batches(hook_name, batch_size, shuffle=True, seed=seed, epochs=None)
        scale = batches.scale(hook_name) if input_scale is None else input_scale
        return (batch_acts(b) for b in stream), torch.as_tensor(scale, dtype=torch.float32), \
            models or list(batches.models), hook_name
    if iter(batches) is batches:  # an iterator: used once
        stream = (batch_acts(b) for b in batches)
    else:
        def cycle() -> Iterator[Tensor]:
            while True:
                empty = True
                for b in batches:
                    empty = False
                    yield batch_acts(b)
                if empty:
                    return
        stream = cycle()
    return stream, None if input_scale is None else torch.as_tensor(input_scale, dtype=torch.float32), models, hook_name


def _is_store(obj: Any) -> bool:
    return hasattr(obj, "batches") and hasattr(obj, "scale") and hasattr(obj, "models")


def batch_acts(batch: Any) -> Tensor:
    acts = batch.acts if hasattr(batch, "acts") else batch
    if not isinstance(acts, Tensor) or acts.dim() != 3:
        raise ValueError(f"a crosscoder batch is a tensor [B, n_models, d_in] (or has .acts of that shape); got "
                         f"{tuple(acts.shape) if isinstance(acts, Tensor) else type(acts).__name__}")
    return acts.float()


def _check_resumable(path: Path, state: dict[str, Any], coder: CrossCoder, **settings: Any) -> None:
    """Refuse to continue a checkpoint made with other settings or data, naming what differs."""
    saved, now = dict(state.get("config", {})), coder.config()
    saved_training = saved.pop("training", {}) or {}
    keys = ("architecture", "k", "d_in", "d_latent", "models", "hook_name", "l1_coeff")
    differ = {k: (saved.get(k), now[k]) for k in keys if saved.get(k) != now[k]}
    differ.update({k: (saved_training.get(k), v) for k, v in settings.items() if saved_training.get(k, v) != v})
    scale = state["coder"].get("input_scale")
    if scale is not None and not torch.allclose(scale.float(), coder.input_scale.float().cpu()):
        differ["input_scale (the data's normalisation)"] = (scale.tolist(), coder.input_scale.tolist())
    if differ:
        shown = ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in differ.items())
        raise ValueError(f"{path} was made with other settings ({shown}); pass resume=False or another checkpoint_dir")


def _latest_checkpoint(folder: Path) -> Path | None:
    found = sorted(folder.glob("step_*.pt")) if folder.is_dir() else []
    return found[-1] if found else None


def _save_checkpoint(folder: Path, coder: CrossCoder, optimizer: torch.optim.Optimizer, step: int,
                     log: TrainingLog, since_fired: Tensor) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:08d}.pt"
    torch.save({"coder": coder.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "threshold": coder.threshold, "log": asdict(log), "config": coder.config(),
                "since_fired": since_fired}, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").replace(path)
    return path


def iter_batches(source: Any, hook_name: str | None, batch_size: int) -> Iterator[Any]:
    """Batches for evaluation: a store's (in order, one epoch, raw scale) or the given iterable's."""
    if _is_store(source):
        if hook_name is None:
            raise ValueError(f"reading an activation store needs a hook name (one of {source.hook_names}); pass "
                             "hook_name= or give the crosscoder one")
        yield from source.batches(hook_name, batch_size, shuffle=False, epochs=1, normalize=False)
    else:
        yield from source


@torch.no_grad()
def fraction_of_variance_explained(coder: CrossCoder, batches: Any, max_batches: int | None = None, *,
                                   hook_name: str | None = None, batch_size: int = 1024) -> dict[str, float]:
    """Per model, `1 - sum ||x - x_hat||^2 / sum ||x - mean(x)||^2` over raw-scale activations
    (`batches`: as for `train_crosscoder`, a store read once in order)."""
    sq_err = torch.zeros(coder.n_models, dtype=torch.float64)
    sq_norm = torch.zeros(coder.n_models, dtype=torch.float64)
    total = torch.zeros(coder.n_models, coder.d_in, dtype=torch.float64)
    n = 0
    for i, batch in enumerate(iter_batches(batches, hook_name or coder.hook_name, batch_size)):
        if max_batches is not None and i >= max_batches:
            break
        x = batch_acts(batch).to(coder.W_enc.device)
        x_hat = coder(x)
        sq_err += (x - x_hat).double().pow(2).sum((0, 2)).cpu()
        sq_norm += x.double().pow(2).sum((0, 2)).cpu()
        total += x.double().sum(0).cpu()
        n += x.shape[0]
    if n == 0:
        raise ValueError("fraction_of_variance_explained got no batches")
    variance = sq_norm - total.pow(2).sum(-1) / n
    return {name: float(1 - sq_err[m] / variance[m]) for m, name in enumerate(coder.models)}
