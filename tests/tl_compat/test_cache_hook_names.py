# Ported from TransformerLens tests/integration/test_cache_hook_names.py (commit 4cd36aa): only the import, the model
# and model-specific constants changed; TL's assertions kept.
from hookedcot import HookedCoT as HookedTransformer  # noqa: F401
from tl_models import tiny_model

MODEL = "smollm2-135m-instruct"

prompt = "Hello World!"

# hookedcot: a 1-layer LLaMA-shaped model (SmolLM2's tokenizer) and the names TL gives a LLaMA
# (RMSNorm, rotary, gated MLP) in place of solu-1l's.
model = tiny_model(1)
act_names_in_cache = [
    "hook_embed",
    "blocks.0.hook_resid_pre",
    "blocks.0.ln1.hook_scale",
    "blocks.0.ln1.hook_normalized",
    "blocks.0.attn.hook_q",
    "blocks.0.attn.hook_k",
    "blocks.0.attn.hook_v",
    "blocks.0.attn.hook_rot_q",
    "blocks.0.attn.hook_rot_k",
    "blocks.0.attn.hook_attn_scores",
    "blocks.0.attn.hook_pattern",
    "blocks.0.attn.hook_z",
    "blocks.0.hook_attn_out",
    "blocks.0.hook_resid_mid",
    "blocks.0.ln2.hook_scale",
    "blocks.0.ln2.hook_normalized",
    "blocks.0.mlp.hook_pre",
    "blocks.0.mlp.hook_pre_linear",
    "blocks.0.mlp.hook_post",
    "blocks.0.hook_mlp_out",
    "blocks.0.hook_resid_post",
    "ln_final.hook_scale",
    "ln_final.hook_normalized",
    "unembed.hook_in",
    "unembed.hook_out",
]


def test_cache_hook_names():
    _, cache = model.run_with_cache(prompt)
    assert list(cache.keys()) == act_names_in_cache


import pytest as _pytest  # noqa: E402

pytestmark = _pytest.mark.tl_compat
