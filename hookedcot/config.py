"""The model's configuration: every number that changes the math, and nothing else.

Architecture differences (Qwen2's qkv bias, tied embeddings, llama3 rope scaling, an explicit
head_dim) are fields here; the forward pass reads them and never asks which family it runs.
Field names follow TransformerLens (`n_layers`, `d_model`, `n_heads`, ...) so `model.cfg` reads
the way TL users expect.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from hookedcot.errors import HookedCoTError
from hookedcot.rope import rope_scaling_problems


class ConfigError(HookedCoTError, ValueError):
    """A checkpoint's configuration asks for something hookedcot does not implement."""


SUPPORTED_ACTIVATIONS = ("silu",)


# The one field TransformerLens code assigns on a loaded model (`model.cfg.default_prepend_bos =
# False`); every other field is fixed once the config is built: the weights' shapes and the math
# follow from it (use `cfg.replace(...)` for a changed copy).
ASSIGNABLE_FIELDS = frozenset({"default_prepend_bos"})


@dataclass
class ModelConfig:
    n_layers: int
    d_model: int
    n_heads: int
    n_key_value_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int = 4096
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # {"rope_type": "llama3", "factor": ..., ...} or None for plain rotary.
    rope_scaling: dict[str, Any] | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    act_fn: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_name: str = "custom"
    family: str = "custom"
    # Where the weights came from; informative only, never read by the forward pass.
    source: str = field(default="", compare=False)
    # TransformerLens' fields that describe the loaded model rather than its math (not compared):
    # where the weights are (HookedCoT keeps it current through `model.to(...)`), and whether
    # text gets a BOS token by default (the tokenizer's own habit unless from_pretrained was told).
    device: str = field(default="cpu", compare=False)
    default_prepend_bos: bool = field(default=True, compare=False)

    def __post_init__(self) -> None:
        problems = []
        for name in ("n_layers", "d_model", "n_heads", "n_key_value_heads", "d_head", "d_mlp", "d_vocab", "n_ctx"):
            value = getattr(self, name)
            if not _is_int(value) or not 0 < value < _MAX_SIZE:
                problems.append(f"{name}={value!r} must be a positive integer below 2**31")
        if not problems and self.n_heads % self.n_key_value_heads:
            problems.append(
                f"n_heads={self.n_heads} is not a multiple of n_key_value_heads={self.n_key_value_heads}"
            )
        if _is_int(self.d_head) and self.d_head % 2:
            problems.append(f"d_head={self.d_head} must be even for rotary embeddings")
        for name in ("norm_eps", "rope_theta"):
            if not _is_positive_number(getattr(self, name)):
                problems.append(f"{name}={getattr(self, name)!r} must be a finite positive number")
        for name in ("qkv_bias", "o_bias", "mlp_bias", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name}={getattr(self, name)!r} must be true or false")
        if self.act_fn not in SUPPORTED_ACTIVATIONS:
            problems.append(f"act_fn={self.act_fn!r} is not supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
        problems += _token_id_problems(self)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, dict):
            problems.append(f"rope_scaling={self.rope_scaling!r} must be a dict or None")
        else:
            problems += rope_scaling_problems(self.rope_scaling) or _rope_value_problems(self.rope_scaling)
        if problems:
            raise ConfigError("invalid ModelConfig: " + "; ".join(problems))

    def __setattr__(self, name: str, value: Any) -> None:
        """Fields are set once (by __init__); afterwards only ASSIGNABLE_FIELDS can change."""
        first_time = name in self.__dataclass_fields__ and name not in self.__dict__
        if name not in self.__dataclass_fields__:
            raise dataclasses.FrozenInstanceError(
                f"ModelConfig has no field {name!r} (TransformerLens switches are methods here, e.g. "
                "model.set_use_attn_result(True))")
        if not first_time and name not in ASSIGNABLE_FIELDS:
            raise dataclasses.FrozenInstanceError(
                f"cannot assign to field {name!r}: a ModelConfig is fixed once built (only "
                f"{', '.join(sorted(ASSIGNABLE_FIELDS))} can be assigned); use cfg.replace({name}=...) for a changed copy"
            )
        object.__setattr__(self, name, value)

    # TransformerLens' read-only fields, for code written against `HookedTransformerConfig`.
    @property
    def d_vocab_out(self) -> int:
        return self.d_vocab

    @property
    def tokenizer_name(self) -> str:
        """Where the tokenizer came from (the checkpoint's folder, hub id or GGUF file)."""
        return self.source or self.model_name

    @property
    def positional_embedding_type(self) -> str:
        return "rotary"

    @property
    def normalization_type(self) -> str:
        return "RMS"

    @property
    def gated_mlp(self) -> bool:
        return True

    @property
    def attn_only(self) -> bool:
        return False

    @property
    def rotary_base(self) -> float:
        return self.rope_theta

    @property
    def rotary_dim(self) -> int:
        return self.d_head

    @property
    def eps(self) -> float:
        return self.norm_eps

    @property
    def original_architecture(self) -> str:
        return {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}.get(self.family, self.family)

    @property
    def n_params(self) -> int:
        """TransformerLens' count: the hidden weights only — attention projections and MLP
        matrices, without embeddings, unembedding, biases or norms (`n_params_total` counts all).
        TransformerLens counts K and V as if every head had its own; this counts the real GQA sizes."""
        d, k, h, g, m = self.d_model, self.d_head, self.n_heads, self.n_key_value_heads, self.d_mlp
        return self.n_layers * (2 * d * h * k + 2 * d * g * k + 3 * d * m)

    @property
    def n_params_total(self) -> int:
        """Every parameter, counting tied embeddings once (`sum(p.numel() for p in model.parameters())`)."""
        d, k, h, g, m, v = self.d_model, self.d_head, self.n_heads, self.n_key_value_heads, self.d_mlp, self.d_vocab
        attn = d * h * k + 2 * d * g * k + h * k * d
        attn += (h * k + 2 * g * k) * self.qkv_bias + d * self.o_bias
        mlp = 3 * d * m + (2 * m + d) * self.mlp_bias
        per_layer = attn + mlp + 2 * d
        return self.n_layers * per_layer + d + v * d * (1 if self.tie_embeddings else 2)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_MAX_SIZE = 2**31  # far above any real model; products of two sizes stay inside torch's int64 shapes


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _token_id_problems(cfg: ModelConfig) -> list[str]:
    """bos / eos / pad must be ids inside the vocabulary (or None): an id past it would index
    outside the embedding at the first generated step, far from the config that caused it."""
    problems = []
    vocab = cfg.d_vocab if _is_int(cfg.d_vocab) else None
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(cfg, name)
        ids = value if name == "eos_token_id" and isinstance(value, list) else [value]
        bad = [i for i in ids if i is not None and (not _is_int(i) or i < 0 or (vocab is not None and i >= vocab))]
        if bad or (name == "eos_token_id" and isinstance(value, list) and None in value):
            problems.append(f"{name}={value!r} must be {'an id or a list of ids' if name == 'eos_token_id' else 'an id'} "
                            f"in [0, d_vocab={cfg.d_vocab}) or None")
    return problems


def _rope_value_problems(scaling: dict[str, Any] | None) -> list[str]:
    """Rope scaling numbers must be finite and positive (a zero factor divides by zero, a NaN
    poisons every rotation), and llama3's two frequency factors must differ (their gap divides)."""
    if scaling is None:
        return []
    problems = []
    for key, value in scaling.items():
        if key == "rope_type":
            continue
        if key == "original_max_position_embeddings" and not (_is_int(value) and value > 0):
            problems.append(f"rope_scaling.{key}={value!r} must be a positive integer")
        elif key != "original_max_position_embeddings" and not _is_positive_number(value):
            problems.append(f"rope_scaling.{key}={value!r} must be a finite positive number")
    if not problems and scaling.get("rope_type") == "llama3" and scaling["low_freq_factor"] == scaling["high_freq_factor"]:
        problems.append(f"rope_scaling low_freq_factor and high_freq_factor are both {scaling['low_freq_factor']}; "
                        "llama3 scaling needs them to differ")
    return problems
