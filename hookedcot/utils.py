"""The `transformer_lens.utils` functions notebooks call, under TransformerLens' names and signatures.

`from hookedcot import utils` stands in for `from transformer_lens import utils`. Where a
behaviour differs (BOS by default, no `datasets` needed), the function's docstring says so.

>>> import torch
>>> get_corner(torch.arange(16).reshape(4, 4), n=2)
tensor([[0, 1],
        [4, 5]])
>>> remove_batch_dim(torch.zeros(1, 3, 2)).shape
torch.Size([3, 2])
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from hookedcot.cache import Slice
from hookedcot.hook_names import get_act_name

if TYPE_CHECKING:
    from hookedcot.hooked import HookedCoT

__all__ = [
    "Slice", "get_act_name", "to_numpy", "get_corner", "remove_batch_dim", "transpose", "lm_cross_entropy_loss",
    "lm_accuracy", "test_prompt", "tokenize_and_concatenate", "input_to_embed", "is_square", "is_lower_triangular",
    "get_attention_mask",
]


def to_numpy(tensor: Any) -> np.ndarray:
    """A tensor (detached, on the CPU; bfloat16 as float32), list, tuple, scalar or array as a numpy array."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, (list, tuple)):
        return np.array(tensor)
    if isinstance(tensor, Tensor):
        tensor = tensor.detach().cpu()
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    if isinstance(tensor, (int, float, bool, str)):
        return np.array(tensor)
    raise ValueError(f"Input to to_numpy has invalid type: {type(tensor)}")


def get_corner(tensor: Any, n: int = 3) -> Any:
    """The first `n` entries along every axis (a peek at a big tensor)."""
    return tensor[tuple(slice(n) for _ in range(tensor.ndim))]


def remove_batch_dim(tensor: Float[Tensor, "1 ..."]) -> Float[Tensor, "..."]:
    """Drops the first axis if it has size 1; otherwise returns the tensor unchanged."""
    return tensor.squeeze(0) if tensor.shape[0] == 1 else tensor


def transpose(tensor: Float[Tensor, "... a b"]) -> Float[Tensor, "... b a"]:
    return tensor.transpose(-1, -2)


def lm_cross_entropy_loss(
    logits: Float[Tensor, "batch pos d_vocab"],
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    per_token: bool = False,
) -> Float[Tensor, ""] | Float[Tensor, "batch pos_minus_1"]:
    """Loss of predicting each NEXT token. `per_token=True`: [batch, pos - 1] (masked positions are
    0); otherwise the mean over the positions where both a token and its successor are unmasked."""
    log_probs = F.log_softmax(logits, dim=-1)
    predicted = log_probs[..., :-1, :].gather(dim=-1, index=tokens[..., 1:, None])[..., 0]
    if attention_mask is not None:
        keep = torch.logical_and(attention_mask[:, :-1], attention_mask[:, 1:])
        predicted = predicted * keep
        n_tokens = keep.sum().item()
    else:
        n_tokens = predicted.numel()
    return -predicted if per_token else -predicted.sum() / n_tokens


def lm_accuracy(
    logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"], per_token: bool = False
) -> Float[Tensor, ""] | Float[Tensor, "batch pos_minus_1"]:
    """Top-1 accuracy of predicting each NEXT token (`per_token=True`: the [batch, pos - 1] booleans)."""
    correct = logits.argmax(dim=-1)[:, :-1] == tokens[:, 1:]
    return correct if per_token else correct.sum() / correct.numel()


def test_prompt(
    prompt: str,
    answer: str | list[str],
    model: "HookedCoT",
    prepend_space_to_answer: bool = True,
    print_details: bool = True,
    prepend_bos: bool | None = None,
    top_k: int = 10,
) -> None:
    """Prints how the model ranks `answer` after `prompt`: each answer token's rank, logit and
    probability, and the top `top_k` tokens, in TransformerLens' words and layout (plain text, no
    bold). A list of answers compares their first tokens as candidates for the next token.

    Differs from TL: `prepend_bos=None` follows the tokenizer (SmolLM2 / Qwen2 add no BOS,
    LLaMA-3 does) where TL's default adds one for every model."""
    tok = model._require_tokenizer()
    answers = [answer] if isinstance(answer, str) else list(answer)
    n_answers, multiple = len(answers), len(answers) > 1
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    prompt_ids = tok.tokenize(prompt, prepend_bos=model._prepend_bos(prepend_bos))[0][0].tolist()
    answer_ids = [tok.encode(a, add_special_tokens=False) for a in answers]
    if any(not ids for ids in answer_ids):
        raise ValueError("an answer tokenizes to no tokens")
    answer_ids = [ids[:1] for ids in answer_ids] if multiple else answer_ids
    tokens = torch.tensor([prompt_ids + ids for ids in answer_ids], device=model.device)
    prompt_str = tok.token_strings(prompt_ids)
    answer_strs = [tok.token_strings(ids) for ids in answer_ids]
    if print_details:
        print("Tokenized prompt:", prompt_str)
        if multiple:
            print("Tokenized answers:", answer_strs)
        else:
            print("Tokenized answer:", answer_strs[0])
    with torch.no_grad():
        logits = model(tokens).float()
    probs = logits.softmax(dim=-1)
    ranks = []
    for index in range(len(prompt_ids), tokens.shape[1]):
        targets = tokens[:, index]
        strs = [a[index - len(prompt_ids)] for a in answer_strs]
        token_probs = probs[:, index - 1]
        sorted_probs, sorted_ids = token_probs.sort(descending=True)
        target_ranks = sorted_ids.argsort(-1)[torch.arange(n_answers), targets.cpu()].tolist()
        ranks.append(list(zip(strs, target_ranks)))
        if print_details:
            print(f"Performance on answer token{'s' if multiple else ''}:\n" + "\n".join(
                f"Rank: {target_ranks[i]: <8} Logit: {logits[i, index - 1, targets[i]].item():5.2f} "
                f"Prob: {token_probs[i, targets[i]].item():6.2%} Token: |{strs[i]}|" for i in range(n_answers)))
            for i in range(top_k):
                print(f"Top {i}th token. Logit: {logits[0, index - 1, sorted_ids[0, i]].item():5.2f} "
                      f"Prob: {sorted_probs[0, i].item():6.2%} Token: |{tok.decode([int(sorted_ids[0, i])])}|")
    print("Ranks of the answer tokens:", ranks if multiple else [r[0] for r in ranks])


test_prompt.__test__ = False  # type: ignore[attr-defined]  # a helper named test_*, not a test


def tokenize_and_concatenate(
    dataset: Iterable[str] | Mapping[str, Sequence[str]],
    tokenizer: Any,
    streaming: bool = False,
    max_length: int = 1024,
    column_name: str = "text",
    add_bos_token: bool = True,
    num_proc: int = 10,
) -> dict[str, Tensor]:
    """Documents tokenized, joined with EOS between them, cut into rows of `max_length` (BOS first
    when `add_bos_token`), as TL's helper does: {"tokens": LongTensor [rows, max_length]}.

    Differs from TL: takes the texts (a list, or anything `dataset[column_name]` gives texts from,
    such as a `datasets.Dataset`) and returns a dict, so `datasets` is not needed; the documents are
    joined as one batch (TL joins each `map` batch of 1,000 and drops each one's remainder).
    `streaming` and `num_proc` are accepted and unused. Text shorter than one row is padded."""
    texts = list(dataset[column_name]) if not isinstance(dataset, (list, tuple)) else list(dataset)
    if tokenizer.eos_token_id is None:
        raise ValueError("Tokenizer must have an EOS token.")
    seq_len = max_length - 1 if add_bos_token else max_length
    ids: list[int] = []
    for i, text in enumerate(texts):
        ids += (tokenizer.encode(text, add_special_tokens=False)) + ([tokenizer.eos_token_id] if i < len(texts) - 1 else [])
    if len(ids) < seq_len:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        ids += [pad] * (seq_len - len(ids))
    rows = torch.tensor(ids[: len(ids) // seq_len * seq_len], dtype=torch.long).view(-1, seq_len)
    if add_bos_token:
        rows = torch.cat([torch.full((rows.shape[0], 1), tokenizer.bos_token_id, dtype=torch.long), rows], 1)
    return {"tokens": rows}


def input_to_embed(
    model: "HookedCoT",
    input: str | list[str] | Int[Tensor, "batch pos"],
    prepend_bos: bool | None = None,
    padding_side: str | None = None,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
) -> tuple[Float[Tensor, "batch pos d_model"], Int[Tensor, "batch pos"], None, Int[Tensor, "batch pos"] | None]:
    """TL's `model.input_to_embed`: (the residual entering block 0, tokens, None, attention mask).

    The third item (TL's shortformer positional embedding) is always None: rotary models add no
    positional vector to the residual. Text is padded on `padding_side` (default: the
    tokenizer's `padding_side`). The residual is the embedding before `hook_embed`'s hooks run."""
    if isinstance(input, (str, list)):
        tok = model._require_tokenizer()
        tokens, mask = tok.tokenize(input, prepend_bos=model._prepend_bos(prepend_bos), padding_side=padding_side or tok.padding_side)
        attention_mask = mask if attention_mask is None else attention_mask
    else:
        tokens = input[None] if input.dim() == 1 else input
    tokens = tokens.to(model.device)
    if attention_mask is not None:
        attention_mask = attention_mask.to(model.device)
    return model.embed(tokens), tokens, None, attention_mask


def is_square(x: Tensor) -> bool:
    """Whether `x` is a square matrix (2-D, equal sides)."""
    return x.ndim == 2 and x.shape[0] == x.shape[1]


def is_lower_triangular(x: Tensor) -> bool:
    """Whether `x` is a square, lower-triangular matrix."""
    return is_square(x) and bool(x.equal(x.tril()))


def get_attention_mask(tokenizer: Any, tokens: Int[Tensor, "batch pos"], prepend_bos: bool) -> Int[Tensor, "batch pos"]:
    """TransformerLens' attention mask: 1 everywhere except the pads at the padded edge.

    Only leading pads (`padding_side == "left"`) or trailing pads (`"right"`) count as padding; a
    pad id inside the text is attended. With left padding, `prepend_bos` and BOS sharing the pad's
    id, the last leading pad is the BOS and stays unmasked. `tokenizer=None` gives all ones.
    """
    if tokenizer is None:
        return torch.ones_like(tokens)
    return padding_mask(tokens, tokenizer.pad_token_id, tokenizer.bos_token_id,
                        getattr(tokenizer, "padding_side", "right"), prepend_bos)


def padding_mask(tokens: Int[Tensor, "batch pos"], pad_token_id: int | None, bos_token_id: int | None,
                 padding_side: str, prepend_bos: bool) -> Int[Tensor, "batch pos"]:
    """`get_attention_mask` with the tokenizer's fields given one by one (no pad id: all ones)."""
    mask = torch.ones_like(tokens)
    if pad_token_id is None:
        return mask
    not_pad = tokens.ne(pad_token_id).long()
    if padding_side == "right":
        trailing = not_pad.flip(-1).cumsum(-1).flip(-1) == 0
        mask[trailing] = 0
    else:
        leading = not_pad.cumsum(-1) == 0
        mask[leading] = 0
        if prepend_bos and bos_token_id == pad_token_id:
            bos_pos = leading.sum(-1) - 1
            mask[torch.arange(mask.shape[0], device=mask.device), bos_pos] = 1
    return mask
