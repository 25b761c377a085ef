"""Latent steps (continuous thought, as in CODI and COCONUT): generation that feeds a vector back.

For `n_latent` steps, the residual the model reads out at the last position goes through a
feedback function and becomes the next position's input embedding, in place of a sampled token;
then ordinary decoding resumes. Each latent step costs one position (a KV cache holds the rest).

The vector read out (`read_from`):
- "resid_post" (default): `blocks.{n_layers-1}.hook_resid_post`, the last block's output before
  the final norm;
- "ln_final": `ln_final.hook_normalized`, the same after the final norm (weight included). This is
  transformers' `hidden_states[-1]`, which CODI and COCONUT feed back: use it with their heads.

Feedback: "identity"; "argmax_embedding" (the embedding of the token the model would pick
greedily there, so latent generation reproduces greedy decoding); a `.safetensors` file holding a
projection (`load_projection`); or any callable `[batch, d_model] -> [batch, d_model]`.

Latent positions are ordinary positions everywhere else: hooks fire on them (`hook.positions`
gives the absolute position), and `LatentTrace.embeds` holds every position's input embedding,
so `model(inputs_embeds=trace.embeds)` replays the run, `model.run_with_cache(inputs_embeds=...)`
caches latent positions, and `prepare_runs(..., clean_embeds=, corrupted_embeds=)` patches them.

    trace = generate_latent(model, "Q: 3 + 4 * 2 = ?\\nA:", 6, "argmax_embedding", end=" The answer is")
    trace.latent_positions     # the 6 positions after the prompt
    trace.text                 # 'Q: 3 + 4 * 2 = ?\\nA:<latent:0>...<latent:5> The answer is'
    logits, cache = model.run_with_cache(inputs_embeds=trace.embeds)   # the same run, in one forward
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Sequence, Union

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from hookedcot.generate import SamplingConfig, _stop_ids, pick_next
from hookedcot.kv_cache import KVCache

if TYPE_CHECKING:
    from hookedcot.hooked import HookedCoT

Feedback = Callable[[Tensor], Tensor]  # read-out [batch, d_model] -> next input embedding [batch, d_model]
FeedbackSpec = Union[str, Path, Mapping[str, Tensor], Feedback]
ReadFrom = Literal["resid_post", "ln_final"]
LATENT = -1  # the token id `LatentTrace.tokens` holds at latent positions
CODI_LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which CODI's head uses (the file does not store it)
LAYOUTS = (
    "a linear layer: 'weight' [d_model, d_model] and optionally 'bias' [d_model]",
    "CODI's projection head (nn.Sequential(Dropout, Linear(d_model, h), GELU, Linear(h, d_model)) plus "
    "LayerNorm 'ln' unless trained with prj_no_ln), keys '1.weight', '1.bias', '3.weight', '3.bias' and "
    "optionally 'ln.weight', 'ln.bias', with or without the prefix 'prj.' (other keys of a full CODI "
    "checkpoint are ignored)",
)


@dataclass
class LatentTrace:
    """One latent generation. Positions count from the first prompt token.

    `embeds` [1, pos, d_model]: every position's input embedding (token embeddings at token
    positions, the fed-back vectors at latent ones). `tokens`: the token id per position, `LATENT`
    (-1) at latent positions. `logits` [1, n, vocab]: the logits computed while generating, at
    positions `logits_from`, `logits_from + 1`, ... (the last prompt position on; each row predicts
    the next position), or None. `prompt_len`: positions before the first latent one (the prompt
    and `begin`)."""

    embeds: Float[Tensor, "1 pos d_model"]
    tokens: list[int]
    latent_positions: list[int]
    prompt_len: int
    logits: Float[Tensor, "1 n d_vocab"] | None = None
    logits_from: int = 0
    tokenizer: Any = None

    @property
    def n_pos(self) -> int:
        return len(self.tokens)

    def step_spans(self) -> list[tuple[int, int]]:
        """[start, end) positions of each latent step: one position each, in order."""
        return [(p, p + 1) for p in self.latent_positions]

    def steps_text(self) -> list[str]:
        """How each latent step reads in `text`: "<latent:i>"."""
        return [latent_label(i) for i in range(len(self.latent_positions))]

    def char_spans(self) -> tuple[str, list[tuple[int, int]]]:
        """(text, each position's [start, end) in it): runs of tokens decoded together, each latent
        position written as "<latent:i>"."""
        if self.tokenizer is None:
            raise ValueError("this trace's model has no tokenizer: read trace.tokens (latent positions hold -1)")
        text, spans = "", []
        run: list[int] = []
        latent = 0

        def flush() -> None:
            nonlocal text
            if run:
                piece, piece_spans = _decode_with_spans(self.tokenizer, run)
                spans.extend((len(text) + a, len(text) + b) for a, b in piece_spans)
                text += piece
                run.clear()

        for t in self.tokens:
            if t != LATENT:
                run.append(t)
                continue
            flush()
            label = latent_label(latent)
            spans.append((len(text), len(text) + len(label)))
            text += label
            latent += 1
        flush()
        return text, spans

    @property
    def text(self) -> str:
        """The decoded sequence, latent positions shown as "<latent:i>"."""
        return self.char_spans()[0]

    def __repr__(self) -> str:
        return (f"LatentTrace({self.n_pos} positions: prompt {self.prompt_len}, latent {self.latent_positions}, "
                f"{self.n_pos - self.prompt_len - len(self.latent_positions)} after)")


def latent_label(i: int) -> str:
    return f"<latent:{i}>"


def _decode_with_spans(tokenizer: Any, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    if hasattr(tokenizer, "char_spans"):
        return tokenizer.char_spans(ids)
    spans, at = [], 0
    for piece in tokenizer.token_strings(ids):
        spans.append((at, at + len(piece)))
        at += len(piece)
    return tokenizer.decode(ids), spans


# ---------------------------------------------------------------------- feedback
def resolve_feedback(model: "HookedCoT", feedback: FeedbackSpec, read_from: ReadFrom = "resid_post") -> Feedback:
    """The feedback function a spec names (see the module docstring)."""
    if callable(feedback):
        return feedback
    if isinstance(feedback, Mapping):
        return load_projection(feedback, model)
    if feedback == "identity":
        return lambda x: x
    if feedback == "argmax_embedding":
        to_logits = model.unembed_resid if read_from == "resid_post" else model.unembed

        def argmax_embedding(x: Tensor) -> Tensor:
            return model.embed(to_logits(x[:, None])[:, -1].argmax(-1))

        return argmax_embedding
    if isinstance(feedback, Path) or (isinstance(feedback, str) and Path(feedback).suffix):
        return load_projection(feedback, model)  # a file: .safetensors, or refused with how to convert it
    raise ValueError(
        f"feedback {feedback!r} is not one this function knows: use 'identity', 'argmax_embedding', a path to a "
        ".safetensors projection, or a function mapping [batch, d_model] to [batch, d_model]"
    )


def load_projection(source: str | Path | Mapping[str, Tensor], model: "HookedCoT") -> Feedback:
    """A projection from a `.safetensors` file (or a state dict) as a feedback function, in the
    model's dtype and device. Accepted layouts: see `LAYOUTS`; anything else is refused with the
    keys found. Shapes are checked against the model's d_model."""
    if isinstance(source, Mapping):
        tensors, where = dict(source), "the state dict"
    else:
        path = Path(source)
        if path.suffix != ".safetensors":
            raise ValueError(f"{path} is not a .safetensors file; for a torch checkpoint, save the projection's "
                             "tensors with safetensors.torch.save_file({k: v for k, v in state_dict.items() if "
                             "k.startswith('prj.')}, 'prj.safetensors')")
        from safetensors.torch import load_file

        tensors, where = load_file(str(path)), str(path)
    d = model.cfg.d_model
    prefixed = {k[len("prj."):]: v for k, v in tensors.items() if k.startswith("prj.")}
    codi = prefixed or tensors  # a full CODI checkpoint also holds the base model: its prj.* alone count
    if "weight" in tensors and set(tensors) <= {"weight", "bias"}:
        params = _checked(tensors, {"weight": (d, d), "bias": (d,)}, where, d)
        return _linear(params["weight"], params.get("bias"))
    if {"1.weight", "3.weight"} <= set(codi) <= set(CODI_KEYS):
        h = codi["1.weight"].shape[0]
        params = _checked(codi, {"1.weight": (h, d), "1.bias": (h,), "3.weight": (d, h), "3.bias": (d,),
                                 "ln.weight": (d,), "ln.bias": (d,)}, where, d)
        return _codi_head(params)
    found = sorted(tensors)
    shown = ", ".join(found[:12]) + (f", ... ({len(found)} keys)" if len(found) > 12 else "")
    raise ValueError(f"{where} holds no projection layout this loader knows (keys: {shown}). Accepted: "
                     + "; ".join(LAYOUTS) + ". Rename the keys to one of these, or pass a function as feedback.")


CODI_KEYS = ("1.weight", "1.bias", "3.weight", "3.bias", "ln.weight", "ln.bias")


def _checked(tensors: dict[str, Tensor], shapes: dict[str, tuple[int, ...]], where: str, d: int) -> dict[str, Tensor]:
    """The tensors, each checked against its expected shape."""
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != shapes[key]:
            raise ValueError(f"{where}: {key!r} has shape {tuple(tensor.shape)}, expected {shapes[key]}: the projection "
                             f"must map this model's d_model ({d}) to itself (was it trained for another model?)")
    return tensors


def _linear(weight: Tensor, bias: Tensor | None) -> Feedback:
    cast: dict[tuple, Tensor] = {}

    def linear(x: Tensor) -> Tensor:
        w, b = _on(cast, x, weight, bias)
        return F.linear(x, w, b)

    return linear


def _codi_head(params: dict[str, Tensor]) -> Feedback:
    """CODI's `prj` at inference: Linear, GELU (exact erf), Linear, then LayerNorm when present."""
    cast: dict[tuple, Tensor] = {}

    def codi_head(x: Tensor) -> Tensor:
        w1, b1, w3, b3, ln_w, ln_b = _on(cast, x, *(params.get(n) for n in CODI_KEYS))
        x = F.linear(F.gelu(F.linear(x, w1, b1)), w3, b3)
        if ln_w is not None or ln_b is not None:
            x = F.layer_norm(x, x.shape[-1:], ln_w, ln_b, CODI_LAYER_NORM_EPS)
        return x

    return codi_head


def _on(cast: dict[tuple, Any], x: Tensor, *tensors: Tensor | None) -> Any:
    """The tensors on x's device and dtype, copied once per (device, dtype): a fresh allocation,
    since BLAS rounds differently for tensors left at a file's unaligned offsets."""
    key = (x.device, x.dtype)
    if key not in cast:
        cast[key] = tuple(None if t is None else t.to(x.device, x.dtype, copy=True) for t in tensors)
    return cast[key]


# ---------------------------------------------------------------------- generation
@torch.no_grad()
def generate_latent(
    model: "HookedCoT",
    prompt: str | Tensor | Sequence[int],
    n_latent: int,
    feedback: FeedbackSpec = "identity",
    *,
    read_from: ReadFrom = "resid_post",
    begin: str | Sequence[int] | Tensor | None = None,
    end: str | Sequence[int] | Tensor | None = None,
    max_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eos: bool = True,
    eos_token_id: int | Sequence[int] | None = None,
    fwd_hooks: Iterable = (),
    return_logits: bool = True,
) -> LatentTrace:
    """Prompt (+ `begin`), `n_latent` latent steps, `end`, then up to `max_new_tokens` tokens.

    `prompt`: text (tokenized with the tokenizer's BOS habit) or token ids of one sequence.
    `begin` / `end`: text (tokenized on its own, without BOS) or token ids put right before and
    right after the latent block, e.g. CODI's BoT / EoT marker tokens and an answer cue; `begin`
    is run with the prompt. Decoding after the block is `model.generate`'s: greedy, or sampling
    with `do_sample`, `temperature`, `top_k`, `top_p`, `seed`; it stops at eos (`stop_at_eos`,
    `eos_token_id`). Hooks in `fwd_hooks` or active around the call fire on every position,
    latent ones included, and what they write is what the next step reads. One sequence at a time."""
    sampling = SamplingConfig(do_sample, temperature, top_k, top_p)
    sampling.validate()
    if n_latent < 0 or max_new_tokens < 0:
        raise ValueError(f"n_latent and max_new_tokens must be >= 0; got {n_latent} and {max_new_tokens}")
    if read_from not in ("resid_post", "ln_final"):
        raise ValueError(f"read_from must be 'resid_post' (the last block's output) or 'ln_final' (after the final "
                         f"norm, transformers' hidden_states[-1]); got {read_from!r}")
    fn = resolve_feedback(model, feedback, read_from)
    head = torch.cat([_ids(model, prompt, "prompt", bos=None), _ids(model, begin, "begin")])
    tail = _ids(model, end, "end")
    if not len(head):
        raise ValueError("the prompt is empty: latent steps read the residual at the prompt's last position")
    stop = set(_stop_ids(model, eos_token_id)) if stop_at_eos else set()
    generator = torch.Generator(device=model.device).manual_seed(seed) if seed is not None else None
    p0 = len(head)
    cache = KVCache(model.cfg, 1, p0 + n_latent + len(tail) + max_new_tokens, model.dtype, model.device)
    read_name = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post" if read_from == "resid_post" else "ln_final.hook_normalized"
    read: dict[str, Tensor] = {}

    def capture(x: Tensor, hook: Any) -> None:
        read["x"] = x[:, -1]

    tokens, latent_embeds, logits_rows = head.tolist(), [], []

    def step(last_only: bool = True, **given: Tensor) -> Tensor:
        """Run the given positions; the last one's logits [1, vocab] (kept with the others')."""
        logits = model(**given, past_kv=cache, last_logits_only=last_only or not return_logits)
        if return_logits:
            logits_rows.extend(logits.unbind(1))
        return logits[:, -1]

    with model.hooks([*fwd_hooks, (read_name, capture)]):
        logits = step(input=head[None])
        for _ in range(n_latent):
            embed = _fed_back(fn, read["x"], model)
            latent_embeds.append(embed)
            tokens.append(LATENT)
            logits = step(inputs_embeds=embed[:, None])
        if len(tail):
            tokens += tail.tolist()
            logits = step(last_only=False, input=tail[None])
        for i in range(max_new_tokens):
            token = int(pick_next(logits, sampling, generator)[0])
            tokens.append(token)
            if token in stop or i == max_new_tokens - 1:
                break
            logits = step(input=torch.tensor([[token]], device=model.device))

    ids = torch.tensor(tokens, device=model.device)
    latent_positions = list(range(p0, p0 + n_latent))
    embeds = model.embed(ids.clamp(min=0))[None]
    if n_latent:
        embeds[0, p0 : p0 + n_latent] = torch.cat(latent_embeds)
    return LatentTrace(
        embeds, tokens, latent_positions, p0,
        logits=torch.stack(logits_rows, dim=1) if return_logits else None, logits_from=p0 - 1,
        tokenizer=getattr(model, "tokenizer", None),
    )


def _fed_back(fn: Feedback, x: Tensor, model: "HookedCoT") -> Tensor:
    out = fn(x)
    d = model.cfg.d_model
    if not isinstance(out, Tensor) or out.shape != (x.shape[0], d):
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"the feedback returned {got}; it must map the read-out [batch, d_model] = "
                         f"{tuple(x.shape)} to a next input embedding of the same shape")
    return out.to(model.dtype)


def _ids(model: "HookedCoT", x: str | Sequence[int] | Tensor | None, what: str, bos: bool | None = False) -> Tensor:
    """Token ids [n] on the model's device; text is tokenized (`bos`: the tokenizer's BOS habit
    when None, no BOS when False)."""
    if x is None:
        return torch.zeros(0, dtype=torch.long, device=model.device)
    if isinstance(x, str):
        return model.to_tokens(x, prepend_bos=bos)[0]
    ids = torch.as_tensor(x, device=model.device).reshape(-1) if not isinstance(x, Tensor) else x.to(model.device)
    if ids.is_floating_point() or (ids.dim() == 2 and ids.shape[0] != 1) or ids.dim() > 2:
        raise ValueError(f"{what} must be text or the token ids of one sequence ([n] or [1, n]); got "
                         f"{ids.dtype} of shape {tuple(ids.shape)}")
    ids = ids.reshape(-1).long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= model.cfg.d_vocab):
        raise ValueError(f"{what} token ids must lie in [0, {model.cfg.d_vocab}); got min {int(ids.min())}, "
                         f"max {int(ids.max())}")
    return ids
