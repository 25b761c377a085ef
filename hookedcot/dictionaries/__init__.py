"""Readers of the residual stream: dictionaries (SAEs) attached by hook name, and the tuned lens.

`load_sae` reads SAELens and EleutherAI sparsify folders; an `SAE` knows its hook name, encodes,
decodes, saves in the SAELens layout and splices itself in (`sae.hook(edit=FeatureEdit(...))`).
"""

from hookedcot.dictionaries.sae import SAE, FeatureEdit, load_sae, sparsify_hook_name

__all__ = ["SAE", "FeatureEdit", "load_sae", "sparsify_hook_name"]
