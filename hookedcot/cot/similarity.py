"""Semantic similarity of two texts from the model's own residual stream (no extra model).

Counterfactual importance asks whether a resampled step says something different from the step it
replaces. Thought Anchors used a sentence-embedding model (all-MiniLM-L6-v2) and a 0.8 cosine
threshold; `ResidualSimilarity` works offline with the model under study: a text's vector is its
middle layer's resid_post averaged over its tokens, and two texts compare by the cosine of their
vectors after subtracting a center.

Two choices make these cosines discriminate, measured on SmolLM2-135M (middle layer):
- each text's first position is left out of the mean: it is an attention sink whose residual is
  ~100 × the norm of the others (norm 21,806 against 150-190), so with it every pair of
  sentences had cosine 1.00;
- the vectors are centered on a reference text's mean token residual (for `resample_steps`, the
  trace's own reasoning): uncentered, unrelated sentences still scored 0.82-0.91 against
  0.97-0.98 for paraphrases. Centered on a short arithmetic reasoning, two paraphrase pairs
  scored 0.91 ("I made an error ... backtrack" / "I made a mistake ... reconsider") and 0.65
  ("So 12 times 7 equals 84" / "Multiplying 12 by 7 gives 84"), unrelated pairs -0.07-0.62.
So the scale is not MiniLM's: the paper's 0.8 is a starting point, not a calibrated threshold for
every model; read `n_kept`, or pass any callable (a: str, b: str) -> float (e.g. a
sentence-transformers model's cosine) as `similarity`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from hookedcot.hooked import HookedCoT


class ResidualSimilarity:
    """cosine(v(a) - c, v(b) - c), v = mean resid_post of `layer` (default the middle one) over a
    text's tokens but its first, c = the same mean over the `reference` text's or token ids'
    positions (None: no centering). Vectors are cached per text; `prepare(texts)` computes missing
    ones `batch_size` texts a forward (left-padded; each row equals the text run alone)."""

    def __init__(self, model: "HookedCoT", reference: str | Sequence[int] | None = None, *, layer: int | None = None,
                 batch_size: int = 32):
        self.model = model
        self.layer = model.cfg.n_layers // 2 if layer is None else layer % model.cfg.n_layers
        self.hook = f"blocks.{self.layer}.hook_resid_post"
        self.batch_size = batch_size
        self._vectors: dict[str, Tensor] = {}
        self.center: Tensor | None = None
        if reference is not None:
            ids = model.to_tokens(reference, prepend_bos=False)[0] if isinstance(reference, str) else reference
            self.center = self._mean_resid(torch.as_tensor(list(ids), device=model.device)[None],
                                           torch.ones(1, len(ids), dtype=torch.long, device=model.device))[0]

    def __call__(self, a: str, b: str) -> float:
        self.prepare([a, b])
        va, vb = self._vectors[a], self._vectors[b]
        if self.center is not None:
            va, vb = va - self.center, vb - self.center
        return float(F.cosine_similarity(va, vb, dim=0))

    def prepare(self, texts: Iterable[str]) -> None:
        """Compute the vectors of the texts not seen yet, in batches."""
        todo = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        for lo in range(0, len(todo), self.batch_size):
            chunk = todo[lo : lo + self.batch_size]
            tokens, mask = self.model.tokenize(chunk, prepend_bos=False)
            for text, vector in zip(chunk, self._mean_resid(tokens, mask)):
                self._vectors[text] = vector

    @torch.inference_mode()
    def _mean_resid(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """[b, d_model] float32: each row's resid_post averaged over its real tokens but the first."""
        _, cache = self.model.run_with_cache(tokens, attention_mask=mask, names_filter=self.hook,
                                             stop_at_layer=self.layer + 1)
        resid = cache[self.hook].float()  # b p d
        first = mask.argmax(-1)  # left padding: the first real position
        counted = mask.bool().clone()
        long_enough = mask.sum(-1) > 1
        counted[torch.arange(len(first), device=mask.device)[long_enough], first[long_enough]] = False
        weights = counted.float()
        return (resid * weights[..., None]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1)
