"""One adapter per tool, all loading the same checkpoint folder and speaking one small interface.

A tool that is not installed, cannot load this checkpoint, or lacks a feature says why instead of
failing the run: `load_tool` raises `Unavailable(reason)`, and a method answers a reason string
(a `str`) where it would answer a callable. Every callable runs under `torch.inference_mode()`
(the timer's) and returns something, so no tool gets to skip work the others do.

Tools: ours (HookedCoT), hf_sdpa (the reference), hf_eager, tl (TransformerLens
`HookedTransformer`, unprocessed weights), bridge (TransformerLens `TransformerBridge`) and
nnsight (`LanguageModel` / `TransformersModel` trace).
"""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

Fn = Callable[[], Any]
FORWARD_CASES = ("plain", "noop_hook_every_layer", "cache_resid_post", "cache_all")
LABELS = {
    "ours": "hookedcot", "hf_sdpa": "HF sdpa", "hf_eager": "HF eager",
    "tl": "TL HookedTransformer", "bridge": "TL TransformerBridge", "nnsight": "nnsight",
}


class Unavailable(Exception):
    """The tool cannot run here; the message says why (it goes into the table)."""


def _noop(*args: Any, **kwargs: Any) -> None:
    return None


def _hf_patch_pre_hook(positions: list[int], values: Tensor):
    """Row i of the batch gets `values[i]` at `positions[i]` in the decoder layer's input."""
    def pre_hook(module, args, kwargs):
        hidden = args[0].clone()
        for row, (pos, value) in enumerate(zip(positions, values)):
            hidden[row, pos] = value
        return (hidden, *args[1:]), kwargs

    return pre_hook


def _hooked_patch(m: Any, tokens: Tensor, layer: int, positions: list[int], values: Tensor, **kwargs: Any) -> Tensor:
    """A user's patched forward through run_with_hooks (hookedcot and TransformerLens alike): one
    batch row per site, a hand-written hook writing row i's position. -> last-position logits [k, vocab]."""
    def patch(x, hook):
        for row, (pos, value) in enumerate(zip(positions, values)):
            x[row, pos] = value
        return x

    batch = tokens.expand(len(positions), -1)
    return m.run_with_hooks(batch, fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", patch)], **kwargs)[:, -1]


def _hooked_forward_cases(m: Any, n_layers: int, tokens: Tensor) -> dict[str, Fn]:
    """The four forward cases through the TransformerLens-style API hookedcot shares with TL:
    run_with_hooks / run_with_cache with the same hook names."""
    noops = [(f"blocks.{layer}.hook_resid_post", _noop) for layer in range(n_layers)]
    resid_post = lambda name: name.endswith("hook_resid_post")  # noqa: E731
    return {
        "plain": lambda: m(tokens),
        "noop_hook_every_layer": lambda: m.run_with_hooks(tokens, fwd_hooks=noops),
        "cache_resid_post": lambda: m.run_with_cache(tokens, names_filter=resid_post),
        "cache_all": lambda: m.run_with_cache(tokens),
    }


class Tool(ABC):
    """The interface; every method may return a reason string instead of a callable."""

    name = "tool"
    model: Any = None

    @abstractmethod
    def forward_cases(self, tokens: Tensor) -> dict[str, Fn | str]:
        """Case name -> a zero-argument callable running it (or the reason this tool cannot)."""

    def generate(self, tokens: Tensor, n_new: int, hook_layer: int | None) -> Fn | str:
        return "not implemented for this tool"

    def resid_pre(self, tokens: Tensor) -> list[Tensor] | str:
        """The residual entering each block, [1, p, d] per layer (the clean run of a patch)."""
        return "not implemented for this tool"

    def patched_last_logits(self, tokens: Tensor, layer: int, positions: list[int], values: Tensor) -> Tensor | str:
        """Last-position logits [k, vocab] of `tokens` [1, p] run as a batch of k = len(positions)
        rows, row i with resid_pre of `layer` at `positions[i]` replaced by `values[i]` [d]."""
        return "not implemented for this tool"

    @abstractmethod
    def last_logits(self, tokens: Tensor) -> Tensor:
        """Logits [vocab] at the last position of a plain forward."""


# ---------------------------------------------------------------- ours
class Ours(Tool):
    name = "ours"

    def __init__(self, folder: Path, dtype: torch.dtype, device: str):
        from hookedcot import HookedCoT

        self.model = HookedCoT.from_pretrained(folder, dtype=dtype, device=device)
        self.n_layers = self.model.cfg.n_layers

    def forward_cases(self, tokens: Tensor) -> dict[str, Fn | str]:
        return _hooked_forward_cases(self.model, self.n_layers, tokens)

    def generate(self, tokens: Tensor, n_new: int, hook_layer: int | None) -> Fn:
        hooks = [] if hook_layer is None else [(f"blocks.{hook_layer}.hook_resid_post", _noop)]
        return lambda: self.model.generate(tokens, max_new_tokens=n_new, stop_at_eos=False, fwd_hooks=hooks)

    def resid_pre(self, tokens: Tensor) -> list[Tensor]:
        names = [f"blocks.{layer}.hook_resid_pre" for layer in range(self.n_layers)]
        _, cache = self.model.run_with_cache(tokens, names_filter=names)
        return [cache[n] for n in names]

    def patched_last_logits(self, tokens: Tensor, layer: int, positions: list[int], values: Tensor) -> Tensor:
        return _hooked_patch(self.model, tokens, layer, positions, values, last_logits_only=True)

    def last_logits(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)[0, -1]


# ---------------------------------------------------------------- transformers
class HF(Tool):
    def __init__(self, folder: Path, dtype: torch.dtype, device: str, attn: str, model: Any = None):
        from transformers import AutoModelForCausalLM

        self.name = f"hf_{attn}"
        self.model = model if model is not None else AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, attn_implementation=attn
        ).to(device).eval()
        self.layers = self.model.model.layers

    def forward_cases(self, tokens: Tensor) -> dict[str, Fn | str]:
        m = self.model

        def with_noop_hooks():
            handles = [layer.register_forward_hook(_noop) for layer in self.layers]
            try:
                return m(input_ids=tokens, use_cache=False).logits
            finally:
                for h in handles:
                    h.remove()

        return {
            "plain": lambda: m(input_ids=tokens, use_cache=False).logits,
            "noop_hook_every_layer": with_noop_hooks,
            "cache_resid_post": lambda: m(input_ids=tokens, use_cache=False, output_hidden_states=True),
            "cache_all": "transformers exposes no activations inside attention / MLP (hidden states only)",
        }

    def generate(self, tokens: Tensor, n_new: int, hook_layer: int | None) -> Fn:
        m = self.model
        mask = torch.ones_like(tokens)
        pad = m.generation_config.pad_token_id
        pad = pad if pad is not None else 0

        def run():
            handle = self.layers[hook_layer].register_forward_hook(_noop) if hook_layer is not None else None
            try:
                return m.generate(
                    tokens, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                    do_sample=False, pad_token_id=pad, use_cache=True,
                )
            finally:
                if handle is not None:
                    handle.remove()

        return run

    def resid_pre(self, tokens: Tensor) -> list[Tensor]:
        hidden = self.model(input_ids=tokens, use_cache=False, output_hidden_states=True).hidden_states
        return list(hidden[: len(self.layers)])  # hidden_states[L] enters block L

    def patched_last_logits(self, tokens: Tensor, layer: int, positions: list[int], values: Tensor) -> Tensor:
        hook = _hf_patch_pre_hook(positions, values)
        handle = self.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            batch = tokens.expand(len(positions), -1)
            return self.model(input_ids=batch, use_cache=False, logits_to_keep=1).logits[:, -1]
        finally:
            handle.remove()

    def last_logits(self, tokens: Tensor) -> Tensor:
        return self.model(input_ids=tokens, use_cache=False).logits[0, -1]


# ---------------------------------------------------------------- TransformerLens
class _TLStyle(Tool):
    """HookedTransformer and TransformerBridge share run_with_hooks / run_with_cache / generate."""

    n_layers: int

    def forward_cases(self, tokens: Tensor) -> dict[str, Fn | str]:
        return _hooked_forward_cases(self.model, self.n_layers, tokens)

    def generate(self, tokens: Tensor, n_new: int, hook_layer: int | None) -> Fn:
        hooks = [] if hook_layer is None else [(f"blocks.{hook_layer}.hook_resid_post", _noop)]

        def run():
            with self.model.hooks(fwd_hooks=hooks):
                return self.model.generate(
                    tokens, max_new_tokens=n_new, stop_at_eos=False, do_sample=False,
                    use_past_kv_cache=True, verbose=False, return_type="tokens",
                )

        return run

    def resid_pre(self, tokens: Tensor) -> list[Tensor]:
        names = [f"blocks.{layer}.hook_resid_pre" for layer in range(self.n_layers)]
        _, cache = self.model.run_with_cache(tokens, names_filter=lambda n: n in names)
        return [cache[n] for n in names]

    def patched_last_logits(self, tokens: Tensor, layer: int, positions: list[int], values: Tensor) -> Tensor:
        return _hooked_patch(self.model, tokens, layer, positions, values)

    def last_logits(self, tokens: Tensor) -> Tensor:
        return self.model(tokens)[0, -1]


@contextlib.contextmanager
def _plain_named_folder(folder: Path):
    """TransformerLens picks hard-coded configs when a name contains 'llama'; a neutral link to
    the folder makes it read config.json like any other local checkpoint."""
    with tempfile.TemporaryDirectory(prefix="hookedcot-bench-") as tmp:
        link = Path(tmp) / "checkpoint"
        os.symlink(folder.resolve(), link)
        yield link


class TL(_TLStyle):
    """`HookedTransformer.from_pretrained_no_processing`, minus its official-name lookup (our
    checkpoints are local folders): TL's own config and state-dict conversion from the HF model."""

    name = "tl"

    def __init__(self, folder: Path, dtype: torch.dtype, device: str, tokenizer: Any = None):
        try:
            import transformer_lens.loading_from_pretrained as loading
            from transformer_lens import HookedTransformer
        except ImportError as err:
            raise Unavailable(f"transformer_lens not importable: {err}") from err
        hf = _load_hf(folder, dtype, device, "eager")
        with _plain_named_folder(folder) as link, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = loading.get_pretrained_model_config(
                str(link), hf_cfg=hf.config.to_dict(), fold_ln=False, device=device, dtype=dtype
            )
            state = loading.get_pretrained_state_dict(str(link), cfg, hf, dtype=dtype)
        model = HookedTransformer(cfg, tokenizer, move_to_device=False)
        model.load_and_process_state_dict(
            state, fold_ln=False, center_writing_weights=False, center_unembed=False,
            fold_value_biases=False, refactor_factored_attn_matrices=False,
        )
        del state
        self.model = model.to(device).eval()
        self.n_layers = cfg.n_layers


class Bridge(_TLStyle):
    """`TransformerBridge.boot_transformers` on the folder (it loads its own HF model, eager attention)."""

    name = "bridge"

    def __init__(self, folder: Path, dtype: torch.dtype, device: str, tokenizer: Any = None):
        try:
            from transformer_lens.model_bridge import TransformerBridge
        except ImportError as err:
            raise Unavailable(f"transformer_lens.model_bridge not importable: {err}") from err
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = TransformerBridge.boot_transformers(str(folder), device=device, dtype=dtype, tokenizer=tokenizer)
        self.model.eval()
        self.n_layers = self.model.cfg.n_layers


# ---------------------------------------------------------------- nnsight
class NNsight(Tool):
    """nnsight's LanguageModel (TransformersModel in 0.8+) wrapping an HF sdpa model."""

    name = "nnsight"

    def __init__(self, folder: Path, dtype: torch.dtype, device: str, tokenizer: Any = None):
        try:
            import nnsight
        except ImportError as err:
            raise Unavailable(f"nnsight not importable: {err}") from err
        hf = _load_hf(folder, dtype, device, "sdpa")
        if tokenizer is None:
            tokenizer = _any_tokenizer(folder)
        cls = getattr(nnsight, "LanguageModel", None) or nnsight.TransformersModel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = cls(hf, tokenizer=tokenizer)
        self.layers = self.model.model.layers
        self.n_layers = len(hf.model.layers)

    def forward_cases(self, tokens: Tensor) -> dict[str, Fn | str]:
        lm, layers = self.model, self.layers

        def plain():
            with lm.trace(tokens):
                out = lm.output.logits.save()
            return out

        def noop():
            with lm.trace(tokens):
                for layer in layers:
                    layer.output  # an intervention that reads and changes nothing
                out = lm.output.logits.save()
            return out

        def cache():
            acts = []  # filled inside the trace: nnsight hands back saved values, not new names' lists
            with lm.trace(tokens):
                for layer in layers:
                    acts.append(layer.output.save())
                out = lm.output.logits.save()
            return out, acts

        return {
            "plain": plain, "noop_hook_every_layer": noop, "cache_resid_post": cache,
            "cache_all": "nnsight has no 'cache every activation' call (each module's output is saved by hand)",
        }

    def generate(self, tokens: Tensor, n_new: int, hook_layer: int | None) -> Fn:
        lm = self.model
        pad = lm.tokenizer.pad_token_id if lm.tokenizer is not None else 0

        def run():
            with lm.generate(tokens, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
                             pad_token_id=pad) as tracer:
                out = tracer.result.save()  # before tracer.all(): code after an unbounded iteration never runs
                if hook_layer is not None:
                    with tracer.all():
                        self.layers[hook_layer].output
            return out

        return run

    def resid_pre(self, tokens: Tensor) -> list[Tensor]:
        acts = []
        with self.model.trace(tokens):
            for layer in self.layers:
                acts.append(layer.input.save())
        return acts

    def patched_last_logits(self, tokens: Tensor, layer: int, positions: list[int], values: Tensor) -> Tensor | str:
        if len(positions) != 1:
            return "batched patching not written for nnsight here"
        with self.model.trace(tokens):
            self.layers[layer].input[:, positions[0]] = values[0]
            out = self.model.output.logits[:, -1].save()
        return out

    def last_logits(self, tokens: Tensor) -> Tensor:
        with self.model.trace(tokens):
            out = self.model.output.logits[0, -1].save()
        return out


# ---------------------------------------------------------------- loading
def _load_hf(folder: Path, dtype: torch.dtype, device: str, attn: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn).to(device).eval()


def _any_tokenizer(folder: Path) -> Any:
    """The checkpoint's tokenizer, else the folder HOOKEDCOT_BENCH_TOKENIZER names, else SmolLM2's
    (random-weight checkpoints have none; every benchmark passes token ids, the tokenizer only
    satisfies the wrappers). None where none of them is at hand."""
    from transformers import AutoTokenizer

    from benchmarks.common import SMOLLM2, checkpoint_folder

    def smollm2() -> Path | None:
        try:
            return checkpoint_folder(SMOLLM2)
        except FileNotFoundError:  # the embedded GGUF is not installed (the GPU machine)
            return None

    for source in (lambda: folder, lambda: os.environ.get("HOOKEDCOT_BENCH_TOKENIZER"), smollm2):
        path = source()
        if path and ((Path(path) / "tokenizer.json").is_file() or (Path(path) / "tokenizer_config.json").is_file()):
            return AutoTokenizer.from_pretrained(path)
    return None


def load_tool(name: str, folder: Path, dtype: torch.dtype, device: str) -> Tool:
    """Load tool `name` on `folder` (TL and nnsight load their own transformers model). Raises
    Unavailable with a reason. Call it in a process of the tool's own: `benchmarks.processes`."""
    try:
        if name == "ours":
            return Ours(folder, dtype, device)
        if name in ("hf_sdpa", "hf_eager"):
            return HF(folder, dtype, device, name.removeprefix("hf_"))
        if name == "tl":
            return TL(folder, dtype, device, tokenizer=_any_tokenizer(folder))
        if name == "bridge":
            return Bridge(folder, dtype, device, tokenizer=_any_tokenizer(folder))
        if name == "nnsight":
            return NNsight(folder, dtype, device)
    except Unavailable:
        raise
    except ImportError as err:
        raise Unavailable(f"not installed ({err})") from err
    except Exception as err:  # a peer that cannot load this checkpoint: say why, go on
        raise Unavailable(f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}") from err
    raise ValueError(f"unknown tool {name!r}")
