"""Analysis cells from TransformerLens' tutorials, run on SmolLM2-135M-Instruct with the import
changed: Exploratory_Analysis_Demo (IOI logit difference, direct logit attribution, activation
patching of the residual stream) and Main_Demo / ARENA 1.2 (induction heads on repeated random
tokens). The cells are TL's; the assertions state what the notebooks show in prose or print side
by side (the logit lens ends at the model's own logit difference, the decomposition sums to it,
patching the one differing position restores the clean run, the model has induction heads)."""

import einops
import pytest
import torch

from hookedcot import HookedCoT as HookedTransformer
from tl_models import einsum  # was: from fancy_einsum import einsum

pytestmark = pytest.mark.tl_compat

@pytest.fixture(scope="module", autouse=True)
def no_grad():
    # The notebooks' `torch.set_grad_enabled(False)`, scoped to this module: at import time it
    # would switch gradients off for every test collected after it (TL's backward-hook tests).
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def model():
    return HookedTransformer.from_pretrained(
        "smollm2-135m-instruct",
        center_unembed=True,
        center_writing_weights=True,
        fold_ln=True,
        refactor_factored_attn_matrices=True,
    )


# --- Exploratory_Analysis_Demo: IOI -------------------------------------------------------------

prompt_format = [
    "When John and Mary went to the shops,{} gave the bag to",
    "When Tom and James went to the park,{} gave the ball to",
    "When Dan and Sid went to the shops,{} gave an apple to",
    "After Martin and Amy went to the park,{} gave a drink to",
]
names = [(" Mary", " John"), (" Tom", " James"), (" Dan", " Sid"), (" Martin", " Amy")]


@pytest.fixture(scope="module")
def ioi(model):
    prompts = []
    answers = []
    for i in range(len(prompt_format)):
        for j in range(2):
            answers.append((names[i][j], names[i][1 - j]))
            prompts.append(prompt_format[i].format(names[i][1 - j]))
    answer_tokens = []
    for i in range(len(answers)):
        answer_tokens.append((model.to_single_token(answers[i][0]), model.to_single_token(answers[i][1])))
    answer_tokens = torch.tensor(answer_tokens).to(model.cfg.device)
    tokens = model.to_tokens(prompts, prepend_bos=True)
    original_logits, cache = model.run_with_cache(tokens)
    return prompts, answer_tokens, tokens, original_logits, cache


def logits_to_ave_logit_diff(logits, answer_tokens, per_prompt=False):
    # Only the final logits are relevant for the answer
    final_logits = logits[:, -1, :]
    answer_logits = final_logits.gather(dim=-1, index=answer_tokens)
    answer_logit_diff = answer_logits[:, 0] - answer_logits[:, 1]
    if per_prompt:
        return answer_logit_diff
    return answer_logit_diff.mean()


def test_ioi_prompts_tokenize_to_equal_lengths(model, ioi):
    prompts, answer_tokens, tokens, original_logits, cache = ioi
    assert tokens.shape[0] == len(prompts) == answer_tokens.shape[0]
    assert original_logits.shape == (len(prompts), tokens.shape[1], model.cfg.d_vocab)


def test_final_residual_times_logit_diff_direction_is_the_logit_diff(model, ioi):
    prompts, answer_tokens, tokens, original_logits, cache = ioi
    original_average_logit_diff = logits_to_ave_logit_diff(original_logits, answer_tokens)

    answer_residual_directions = model.tokens_to_residual_directions(answer_tokens)
    assert answer_residual_directions.shape == (len(prompts), 2, model.cfg.d_model)
    logit_diff_directions = answer_residual_directions[:, 0] - answer_residual_directions[:, 1]

    final_residual_stream = cache["resid_post", -1]
    final_token_residual_stream = final_residual_stream[:, -1, :]
    scaled_final_token_residual_stream = cache.apply_ln_to_stack(
        final_token_residual_stream, layer=-1, pos_slice=-1
    )
    average_logit_diff = einsum(
        "batch d_model, batch d_model -> ", scaled_final_token_residual_stream, logit_diff_directions
    ) / len(prompts)
    # The demo prints these two side by side: "Calculated average logit diff" == "Original logit difference"
    torch.testing.assert_close(average_logit_diff, original_average_logit_diff, rtol=1e-3, atol=1e-3)


def residual_stack_to_logit_diff(residual_stack, cache, logit_diff_directions, prompts):
    scaled_residual_stack = cache.apply_ln_to_stack(residual_stack, layer=-1, pos_slice=-1)
    return einsum(
        "... batch d_model, batch d_model -> ...", scaled_residual_stack, logit_diff_directions
    ) / len(prompts)


def test_logit_lens_and_layer_attribution(model, ioi):
    prompts, answer_tokens, tokens, original_logits, cache = ioi
    original_average_logit_diff = logits_to_ave_logit_diff(original_logits, answer_tokens)
    answer_residual_directions = model.tokens_to_residual_directions(answer_tokens)
    logit_diff_directions = answer_residual_directions[:, 0] - answer_residual_directions[:, 1]

    accumulated_residual, labels = cache.accumulated_resid(
        layer=-1, incl_mid=True, pos_slice=-1, return_labels=True
    )
    logit_lens_logit_diffs = residual_stack_to_logit_diff(accumulated_residual, cache, logit_diff_directions, prompts)
    assert len(labels) == logit_lens_logit_diffs.shape[0] == 2 * model.cfg.n_layers + 1
    # The logit lens ends at the model's own answer.
    torch.testing.assert_close(logit_lens_logit_diffs[-1], original_average_logit_diff, rtol=1e-3, atol=1e-3)

    per_layer_residual, labels = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    per_layer_logit_diffs = residual_stack_to_logit_diff(per_layer_residual, cache, logit_diff_directions, prompts)
    assert len(labels) == per_layer_logit_diffs.shape[0] == 2 * model.cfg.n_layers + 1
    # The per-layer contributions add up to it (the scale is the cached, shared one).
    torch.testing.assert_close(per_layer_logit_diffs.sum(), original_average_logit_diff, rtol=1e-3, atol=1e-3)


def test_head_attribution(model, ioi):
    prompts, answer_tokens, tokens, original_logits, cache = ioi
    answer_residual_directions = model.tokens_to_residual_directions(answer_tokens)
    logit_diff_directions = answer_residual_directions[:, 0] - answer_residual_directions[:, 1]

    per_head_residual, labels = cache.stack_head_results(layer=-1, pos_slice=-1, return_labels=True)
    per_head_logit_diffs = residual_stack_to_logit_diff(per_head_residual, cache, logit_diff_directions, prompts)
    per_head_logit_diffs = einops.rearrange(
        per_head_logit_diffs,
        "(layer head_index) -> layer head_index",
        layer=model.cfg.n_layers,
        head_index=model.cfg.n_heads,
    )
    assert labels[:2] == ["L0H0", "L0H1"]
    # Heads plus the rest of the residual stream (embedding, MLPs, output biases) give the total.
    attn_out = torch.stack([cache["attn_out", layer][:, -1] for layer in range(model.cfg.n_layers)])
    attn_logit_diffs = residual_stack_to_logit_diff(attn_out, cache, logit_diff_directions, prompts)
    torch.testing.assert_close(per_head_logit_diffs.sum(-1), attn_logit_diffs, rtol=1e-3, atol=1e-3)


def test_activation_patching_resid_pre(model, ioi):
    import hookedcot.patching as patching  # the demo: import transformer_lens.patching as patching

    prompts, answer_tokens, tokens, original_logits, cache = ioi
    # The demo sweeps all 8 prompts; the first pair keeps 30 layers x all positions affordable on CPU.
    prompts, answer_tokens, tokens = prompts[:2], answer_tokens[:2], tokens[:2]
    original_logits, cache = model.run_with_cache(tokens)
    # The demo's corrupted run: each prompt with its partner's subject (only S2 differs).
    corrupted_prompts = []
    for i in range(0, len(prompts), 2):
        corrupted_prompts.append(prompts[i + 1])
        corrupted_prompts.append(prompts[i])
    corrupted_tokens = model.to_tokens(corrupted_prompts, prepend_bos=True)
    corrupted_logits, corrupted_cache = model.run_with_cache(corrupted_tokens, return_type="logits")
    corrupted_average_logit_diff = logits_to_ave_logit_diff(corrupted_logits, answer_tokens)
    original_average_logit_diff = logits_to_ave_logit_diff(original_logits, answer_tokens)

    def ioi_metric(logits, answer_tokens=answer_tokens):
        return (logits_to_ave_logit_diff(logits, answer_tokens) - corrupted_average_logit_diff) / (
            original_average_logit_diff - corrupted_average_logit_diff
        )

    resid_pre_act_patch_results = patching.get_act_patch_resid_pre(model, corrupted_tokens, cache, ioi_metric)
    assert resid_pre_act_patch_results.shape == (model.cfg.n_layers, tokens.shape[1])
    # Only the S2 token differs: patching it at layer 0 restores the clean run; patching any other
    # position at layer 0 (the same embedding in both runs) changes nothing.
    differs = (tokens != corrupted_tokens).any(0).nonzero().flatten()
    assert len(differs) == 1
    s2 = int(differs[0])
    torch.testing.assert_close(resid_pre_act_patch_results[0, s2], torch.tensor(1.0), rtol=1e-3, atol=1e-3)
    others = [p for p in range(tokens.shape[1]) if p != s2]
    torch.testing.assert_close(resid_pre_act_patch_results[0, others], torch.zeros(len(others)), rtol=0, atol=1e-3)


# --- Main_Demo / ARENA 1.2: induction heads -------------------------------------------------------

seq_len = 50
batch = 4


@pytest.fixture(scope="module")
def repeated_tokens(model):
    torch.manual_seed(0)
    random_tokens = torch.randint(1000, 10000, (batch, seq_len)).to(model.cfg.device)
    bos = torch.full((batch, 1), model.tokenizer.bos_token_id, dtype=torch.long, device=model.cfg.device)
    return torch.cat([bos, random_tokens, random_tokens], dim=1)


def test_repeated_tokens_are_predicted_in_the_second_half(model, repeated_tokens):
    loss = model(repeated_tokens, return_type="loss", loss_per_token=True)
    assert loss.shape == (batch, 2 * seq_len)
    first_half, second_half = loss[:, :seq_len].mean(), loss[:, seq_len:].mean()
    assert second_half < first_half - 2.0, (first_half, second_half)


def test_induction_scores_with_a_pattern_hook(model, repeated_tokens):
    induction_score_store = torch.zeros((model.cfg.n_layers, model.cfg.n_heads), device=model.cfg.device)

    def induction_score_hook(pattern, hook):
        # pattern: [batch, head_index, dest_pos, source_pos]
        induction_stripe = pattern.diagonal(dim1=-2, dim2=-1, offset=1 - seq_len)
        induction_score = einops.reduce(induction_stripe, "batch head_index position -> head_index", "mean")
        induction_score_store[hook.layer(), :] = induction_score

    pattern_hook_names_filter = lambda name: name.endswith("pattern")  # noqa: E731
    model.run_with_hooks(
        repeated_tokens,
        return_type=None,
        fwd_hooks=[(pattern_hook_names_filter, induction_score_hook)],
    )
    assert induction_score_store.max() > 0.4, induction_score_store.max()


def test_induction_heads_from_a_cache_without_batch_dim(model, repeated_tokens):
    # ARENA 1.2: run_with_cache(remove_batch_dim=True), then the stripe of each head's pattern.
    _, cache = model.run_with_cache(repeated_tokens[:1], remove_batch_dim=True)
    scores = []
    for layer in range(model.cfg.n_layers):
        attention_pattern = cache["pattern", layer]
        assert attention_pattern.shape == (model.cfg.n_heads, 2 * seq_len + 1, 2 * seq_len + 1)
        for head in range(model.cfg.n_heads):
            scores.append(attention_pattern[head].diagonal(-seq_len + 1).mean())
    assert max(scores) > 0.4
