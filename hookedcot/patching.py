"""`from hookedcot import patching` for `from transformer_lens import patching`.

A thin alias of `hookedcot.tl_patching` (TransformerLens' activation-patching functions, same names,
arguments and result shapes); see that module for how the work is done. Not to be confused with
`hookedcot.interp.patching`, hookedcot's own batched patching engine, which these functions run on.
"""

from hookedcot.tl_patching import (
    AXIS_RANGES,
    POSITION_BLOCKS,
    PatchingMetric,
    generic_activation_patch,
    get_act_patch_attn_head_all_pos_every,
    get_act_patch_attn_head_by_pos_every,
    get_act_patch_attn_head_k_all_pos,
    get_act_patch_attn_head_k_by_pos,
    get_act_patch_attn_head_out_all_pos,
    get_act_patch_attn_head_out_by_pos,
    get_act_patch_attn_head_pattern_all_pos,
    get_act_patch_attn_head_pattern_by_pos,
    get_act_patch_attn_head_pattern_dest_src_pos,
    get_act_patch_attn_head_q_all_pos,
    get_act_patch_attn_head_q_by_pos,
    get_act_patch_attn_head_v_all_pos,
    get_act_patch_attn_head_v_by_pos,
    get_act_patch_attn_out,
    get_act_patch_block_every,
    get_act_patch_mlp_out,
    get_act_patch_resid_mid,
    get_act_patch_resid_pre,
    layer_head_dest_src_pos_pattern_patch_setter,
    layer_head_pattern_patch_setter,
    layer_head_pos_pattern_patch_setter,
    layer_head_vector_patch_setter,
    layer_pos_head_vector_patch_setter,
    layer_pos_patch_setter,
)

__all__ = [
    "AXIS_RANGES", "POSITION_BLOCKS", "PatchingMetric", "generic_activation_patch",
    "get_act_patch_attn_head_all_pos_every", "get_act_patch_attn_head_by_pos_every",
    "get_act_patch_attn_head_k_all_pos", "get_act_patch_attn_head_k_by_pos",
    "get_act_patch_attn_head_out_all_pos", "get_act_patch_attn_head_out_by_pos",
    "get_act_patch_attn_head_pattern_all_pos", "get_act_patch_attn_head_pattern_by_pos",
    "get_act_patch_attn_head_pattern_dest_src_pos", "get_act_patch_attn_head_q_all_pos",
    "get_act_patch_attn_head_q_by_pos", "get_act_patch_attn_head_v_all_pos", "get_act_patch_attn_head_v_by_pos",
    "get_act_patch_attn_out", "get_act_patch_block_every", "get_act_patch_mlp_out", "get_act_patch_resid_mid",
    "get_act_patch_resid_pre", "layer_head_dest_src_pos_pattern_patch_setter", "layer_head_pattern_patch_setter",
    "layer_head_pos_pattern_patch_setter", "layer_head_vector_patch_setter", "layer_pos_head_vector_patch_setter",
    "layer_pos_patch_setter",
]
