"""Latent steps (continuous thought): generation that feeds a read-out back as the next input
embedding, and latent positions as ordinary positions in hooks, caches and patching.

Oracles are written here without the code under test: greedy decoding as a loop of full forwards,
projections as torch.nn modules, patching as one hand-hooked forward per site."""

from __future__ import annotations

import pytest
import torch
from model_factory import CharTokenizer, random_model
from safetensors.torch import save_file
from torch import nn

from hookedcot import HookedCoT, ModelConfig, get_act_name
from hookedcot.cot.latent import LATENT, generate_latent, load_projection
from hookedcot.interp.metrics import kl_divergence
from hookedcot.interp.patching import Site, kl_metric, prepare_runs, run_sites

CFG = ModelConfig(n_layers=3, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=128,
                  norm_eps=1e-6, qkv_bias=True, model_name="tiny-char")
GREEDY_QUIRKS = ["qwen2", "llama32", "llama_bias", "smollm2_like"]


@pytest.fixture(scope="module")
def model() -> HookedCoT:
    return random_model(CFG, tokenizer=CharTokenizer())


def prompt_ids(n: int = 9, seed: int = 0, vocab: int = CFG.d_vocab) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def greedy_by_full_forwards(model: HookedCoT, ids: torch.Tensor, n: int) -> tuple[list[int], torch.Tensor]:
    """(n greedy tokens, the logits [n, vocab] each was picked from), one full forward per token."""
    seq, rows = ids.tolist(), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq]))[0, -1]
            rows.append(logits)
            seq.append(int(logits.argmax()))
    return seq[len(ids):], torch.stack(rows)


def check_reproduces_greedy(model: HookedCoT, ids: torch.Tensor, k: int, m: int) -> None:
    trace = generate_latent(model, ids, k, "argmax_embedding", max_new_tokens=m, stop_at_eos=False)
    greedy, oracle_logits = greedy_by_full_forwards(model, ids, k + m)
    p0 = len(ids)
    assert trace.latent_positions == list(range(p0, p0 + k))
    assert trace.tokens == ids.tolist() + [LATENT] * k + greedy[k:]
    generated = model.generate(ids[None], k + m, stop_at_eos=False)[0].tolist()
    assert generated == ids.tolist() + greedy
    # the latent inputs are exactly the embeddings of the tokens greedy decoding picked there
    assert torch.equal(trace.embeds[0, p0 : p0 + k], model.W_E[greedy[:k]])
    assert torch.equal(trace.embeds[0, :p0], model.W_E[ids])
    assert trace.logits_from == p0 - 1 and trace.logits.shape == (1, k + m, model.cfg.d_vocab)
    torch.testing.assert_close(trace.logits[0], oracle_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quirk", GREEDY_QUIRKS)
def test_argmax_embedding_feedback_reproduces_greedy_decoding_token_for_token_and_logit_for_logit(
        quirk, tiny_checkpoints):
    model = HookedCoT.from_pretrained(tiny_checkpoints[quirk])
    check_reproduces_greedy(model, prompt_ids(vocab=model.cfg.d_vocab, seed=len(quirk)), k=4, m=3)


def test_argmax_embedding_feedback_reproduces_greedy_decoding_on_smollm2(smol_model):
    ids = smol_model.to_tokens("Q: Tom has 3 apples and buys 4 more. How many?\nA:")[0]
    check_reproduces_greedy(smol_model, ids, k=3, m=2)


def test_identity_feedback_replayed_from_its_embeddings_gives_the_logits_recorded_while_generating(model):
    ids = prompt_ids()
    trace = generate_latent(model, ids, 3, "identity", begin=[5, 6], end=[7, 8, 9], max_new_tokens=4,
                            stop_at_eos=False)
    assert trace.prompt_len == 11 and trace.latent_positions == [11, 12, 13]
    assert trace.tokens[:14] == ids.tolist() + [5, 6] + [LATENT] * 3 and trace.tokens[14:17] == [7, 8, 9]
    assert trace.n_pos == 21 and trace.embeds.shape == (1, 21, CFG.d_model)
    n = CFG.n_layers
    with torch.no_grad():
        replay, cache = model.run_with_cache(inputs_embeds=trace.embeds)
    rows = trace.logits.shape[1]
    assert rows == trace.n_pos - trace.logits_from - 1  # every position run from the prompt's last on
    torch.testing.assert_close(replay[:, trace.logits_from : trace.logits_from + rows], trace.logits,
                               rtol=1e-4, atol=1e-4)
    # each latent input is the last block's output at the position before it (before the final norm)
    resid = cache["resid_post", n - 1][0]
    for p in trace.latent_positions:
        torch.testing.assert_close(trace.embeds[0, p], resid[p - 1], rtol=1e-4, atol=1e-4)
    # the decoded tokens continue greedily from the end tokens
    assert trace.tokens[17:] == replay[0, 16:20].argmax(-1).tolist()


def test_read_from_ln_final_feeds_the_normalized_residual_as_transformers_hidden_states_last(model):
    trace = generate_latent(model, prompt_ids(), 3, "identity", read_from="ln_final")
    with torch.no_grad():
        _, cache = model.run_with_cache(inputs_embeds=trace.embeds)
        resid = cache["resid_post", CFG.n_layers - 1][0]
        rms = resid * torch.rsqrt(resid.pow(2).mean(-1, keepdim=True) + CFG.norm_eps)
        normed = model.ln_final.weight * rms
    for p in trace.latent_positions:
        torch.testing.assert_close(trace.embeds[0, p], normed[p - 1], rtol=1e-4, atol=1e-4)
    # argmax feedback is the same greedy token whichever vector it reads
    by_resid = generate_latent(model, prompt_ids(), 3, "argmax_embedding")
    by_norm = generate_latent(model, prompt_ids(), 3, "argmax_embedding", read_from="ln_final")
    assert torch.equal(by_resid.embeds, by_norm.embeds)


def test_hooks_fire_on_latent_positions_with_their_absolute_positions(model):
    ids = prompt_ids()
    seen: list[tuple[list[int], torch.Tensor]] = []

    def record(x, hook):
        seen.append((hook.positions.tolist(), x[0].clone()))

    trace = generate_latent(model, ids, 3, "identity", end=[7, 8], max_new_tokens=2, stop_at_eos=False,
                            fwd_hooks=[("hook_embed", record)])
    assert [pos for pos, _ in seen] == [list(range(9)), [9], [10], [11], [12, 13], [14]]
    for positions, x in seen:  # what layer 0 read is the trace's input embedding, latent or not
        assert torch.equal(x, trace.embeds[0, positions])
    seen.clear()
    with model.hooks([("hook_embed", record)]):
        again = generate_latent(model, ids, 3, "identity", end=[7, 8], max_new_tokens=2, stop_at_eos=False)
    assert [pos for pos, _ in seen] == [list(range(9)), [9], [10], [11], [12, 13], [14]]
    assert torch.equal(again.embeds, trace.embeds)


def test_an_edit_by_a_hook_at_a_latent_position_is_what_the_next_step_reads(model):
    n = CFG.n_layers
    shift = torch.randn(CFG.d_model, generator=torch.Generator().manual_seed(5))
    written: dict[int, torch.Tensor] = {}

    def steer(x, hook):
        if int(hook.positions[-1]) in (9, 10):  # the first two latent positions
            x = x + shift
            written[int(hook.positions[-1])] = x[0, -1].clone()
            return x
        return None

    trace = generate_latent(model, prompt_ids(), 3, "identity", fwd_hooks=[(get_act_name("resid_post", n - 1), steer)])
    assert torch.equal(trace.embeds[0, 10], written[9]) and torch.equal(trace.embeds[0, 11], written[10])
    plain = generate_latent(model, prompt_ids(), 3, "identity")
    assert torch.equal(plain.embeds[0, :10], trace.embeds[0, :10])
    assert not torch.allclose(plain.embeds[0, 10], trace.embeds[0, 10])


def read_outs(model: HookedCoT, read_name: str) -> tuple[list, dict[int, torch.Tensor]]:
    """A hook recording the last position's read-out per forward, by absolute position."""
    got: dict[int, torch.Tensor] = {}

    def record(x, hook):
        got[int(hook.positions[-1])] = x[:, -1].clone()

    return [(read_name, record)], got


def test_a_linear_projection_from_safetensors_is_applied_exactly(model, tmp_path):
    torch.manual_seed(1)
    linear = nn.Linear(CFG.d_model, CFG.d_model)
    path = tmp_path / "linear.safetensors"
    save_file({k: v.contiguous() for k, v in linear.state_dict().items()}, str(path))
    x = torch.randn(2, CFG.d_model)
    with torch.no_grad():
        assert torch.equal(load_projection(path, model)(x), linear(x))
        hooks, got = read_outs(model, get_act_name("resid_post", CFG.n_layers - 1))
        trace = generate_latent(model, prompt_ids(), 3, str(path), fwd_hooks=hooks)
        for p in trace.latent_positions:
            assert torch.equal(trace.embeds[0, p], linear(got[p - 1])[0])
    no_bias = nn.Linear(CFG.d_model, CFG.d_model, bias=False)
    save_file({"weight": no_bias.weight.detach().contiguous()}, str(tmp_path / "w.safetensors"))
    with torch.no_grad():
        assert torch.equal(load_projection(tmp_path / "w.safetensors", model)(x), no_bias(x))


def codi_head(d: int, h: int, with_ln: bool) -> nn.Sequential:
    """CODI's `prj` as its training code builds it (src/model.py of zhenyi4/codi)."""
    head = nn.Sequential(nn.Dropout(0.0), nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))
    if with_ln:
        head.add_module("ln", nn.LayerNorm(d))
        with torch.no_grad():
            head.ln.weight.normal_(1.0, 0.3)
            head.ln.bias.normal_(0.0, 0.3)
    return head.eval()


@pytest.mark.parametrize("with_ln", [True, False], ids=["with_ln", "prj_no_ln"])
@pytest.mark.parametrize("prefix", ["prj.", ""], ids=["full_checkpoint", "head_alone"])
def test_codis_projection_head_from_safetensors_is_applied_exactly(model, tmp_path, with_ln, prefix):
    torch.manual_seed(2)
    head = codi_head(CFG.d_model, 48, with_ln)
    tensors = {prefix + k: v.contiguous() for k, v in head.state_dict().items()}
    if prefix:  # a whole CODI checkpoint: the base model's tensors sit beside prj.*
        tensors["codi.base_model.model.model.embed_tokens.weight"] = torch.randn(7, 5)
    path = tmp_path / "codi.safetensors"
    save_file(tensors, str(path))
    x = torch.randn(3, CFG.d_model)
    with torch.no_grad():
        assert torch.equal(load_projection(path, model)(x), head(x))
        hooks, got = read_outs(model, "ln_final.hook_normalized")
        trace = generate_latent(model, prompt_ids(), 3, path.as_posix(), read_from="ln_final", fwd_hooks=hooks)
        for p in trace.latent_positions:
            assert torch.equal(trace.embeds[0, p], head(got[p - 1])[0])


def test_wrong_shapes_and_unknown_layouts_are_refused_with_the_fix(model, tmp_path):
    d = CFG.d_model
    cases = {
        "unknown": ({"proj.weight": torch.zeros(d, d)}, r"keys: proj\.weight\).*Accepted: a linear layer.*CODI"),
        "wide": ({"weight": torch.zeros(d, d + 1)}, rf"'weight' has shape \({d}, {d + 1}\), expected \({d}, {d}\).*d_model \({d}\)"),
        "bias": ({"weight": torch.zeros(d, d), "bias": torch.zeros(d - 1)}, r"'bias' has shape"),
        "codi": ({"prj.1.weight": torch.zeros(16, d + 2), "prj.3.weight": torch.zeros(d, 16)}, r"'1.weight' has shape"),
        "stray": ({"weight": torch.zeros(d, d), "scale": torch.zeros(1)}, r"keys: scale, weight"),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ValueError, match=message):
            generate_latent(model, prompt_ids(), 2, tmp_path / f"{name}.safetensors")
    with pytest.raises(ValueError, match="safetensors.torch.save_file"):
        load_projection(tmp_path / "prj.bin", model)
    with pytest.raises(ValueError, match="'identity', 'argmax_embedding', a path"):
        generate_latent(model, prompt_ids(), 2, "argmax")
    with pytest.raises(ValueError, match=r"feedback returned \(1, 31\).*same shape"):
        generate_latent(model, prompt_ids(), 2, lambda x: x[:, :-1])
    with pytest.raises(ValueError, match="read_from must be"):
        generate_latent(model, prompt_ids(), 2, read_from="hook_embed")
    with pytest.raises(ValueError, match=r"end token ids must lie in \[0, 128\)"):
        generate_latent(model, prompt_ids(), 2, end=[500])


def test_without_latent_steps_it_is_model_generate_sampling_and_eos_included(model):
    ids = prompt_ids()
    sampled = generate_latent(model, ids, 0, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, seed=3,
                              stop_at_eos=False)
    reference = model.generate(ids[None], 6, do_sample=True, temperature=0.8, top_k=20, seed=3, stop_at_eos=False)
    assert sampled.tokens == reference[0].tolist() and sampled.latent_positions == []
    eos = sampled.tokens[len(ids) + 2]
    stopped = generate_latent(model, ids, 0, max_new_tokens=6, do_sample=True, temperature=0.8, top_k=20, seed=3,
                              eos_token_id=eos)
    assert stopped.tokens == sampled.tokens[: sampled.tokens.index(eos, len(ids)) + 1]


def test_text_shows_latent_positions_and_each_step_spans_one_position(model):
    trace = generate_latent(model, "Q: 2+2?\nA:", 2, "argmax_embedding", begin="<", end="> so", max_new_tokens=3,
                            stop_at_eos=False)
    text, spans = trace.char_spans()
    assert text == trace.text and text.startswith("Q: 2+2?\nA:<<latent:0><latent:1>> so")
    assert trace.step_spans() == [(11, 12), (12, 13)] and trace.steps_text() == ["<latent:0>", "<latent:1>"]
    assert [text[a:b] for a, b in spans[10:16]] == ["<", "<latent:0>", "<latent:1>", ">", " ", "s"]
    assert len(spans) == trace.n_pos and "latent [11, 12]" in repr(trace)


# ---------------------------------------------------------------------- patching latent positions
@pytest.fixture(scope="module")
def latent_pair(model):
    """Two latent runs whose prompts differ in one token: (clean trace, corrupted trace)."""
    clean = prompt_ids(10, seed=4)
    corrupted = clean.clone()
    corrupted[3] = (corrupted[3] + 1) % CFG.d_vocab
    runs = [generate_latent(model, ids, 4, "identity", end=[65, 66]) for ids in (clean, corrupted)]
    return runs[0], runs[1]


def test_patching_a_latent_position_from_a_run_into_itself_changes_nothing(model, latent_pair):
    _, corrupted = latent_pair
    names = [get_act_name("resid_pre", L) for L in range(CFG.n_layers)]
    runs = prepare_runs(model, None, None, names, clean_embeds=corrupted.embeds, corrupted_embeds=corrupted.embeds)
    assert runs.label_tokens is None and runs.n_pos == corrupted.n_pos
    sites = [Site(n, (p,)) for n in names for p in corrupted.latent_positions] + [
        Site(n, tuple(corrupted.latent_positions)) for n in names]
    kl = run_sites(runs, sites, kl_metric(runs), progress=False)
    assert torch.all(kl.abs() <= 1e-6)
    for site in sites[:: len(corrupted.latent_positions)]:  # alone and from position 0: bit for bit
        assert run_sites(runs, [site], kl_metric(runs), progress=False, reuse_prefix=False).item() == 0.0


def test_a_latent_position_sweep_equals_one_hand_hooked_forward_per_site(model, latent_pair):
    clean, corrupted = latent_pair
    names = [get_act_name("resid_pre", L) for L in range(CFG.n_layers)]
    runs = prepare_runs(model, None, None, names, clean_embeds=clean.embeds, corrupted_embeds=corrupted.embeds)
    sites = [Site(n, (p,)) for n in names for p in clean.latent_positions] + [Site(names[1], (10, 12))]
    with torch.no_grad():
        base = model(inputs_embeds=corrupted.embeds)[:, -1:]
        _, clean_cache = model.run_with_cache(inputs_embeds=clean.embeds)
    swept = run_sites(runs, sites, lambda lg: kl_divergence(lg, base.expand_as(lg))[:, 0], progress=False)
    for i, site in enumerate(sites):
        pos = list(site.positions)

        def patch(x, hook, pos=pos, name=site.hook):
            x = x.clone()
            x[:, pos] = clean_cache[name][:, pos]
            return x

        with torch.no_grad():
            patched = model.run_with_hooks(inputs_embeds=corrupted.embeds, fwd_hooks=[(site.hook, patch)])[:, -1:]
        assert abs(float(swept[i]) - float(kl_divergence(patched, base)[0, 0])) < 1e-5, site
    assert float(swept.max()) > 1e-4  # the runs differ, so some patch moves the answer


def test_prepare_runs_with_clean_embeds_equals_prepare_runs_with_the_clean_tokens(model):
    clean = prompt_ids(12, seed=7)[None]
    corrupted = clean.clone()
    corrupted[0, 5] = (corrupted[0, 5] + 3) % CFG.d_vocab
    names = [get_act_name("resid_pre", L) for L in range(CFG.n_layers)]
    by_tokens = prepare_runs(model, clean, corrupted, names)
    embeds = model.W_E[clean].detach()
    by_embeds = prepare_runs(model, None, corrupted, names, clean_embeds=embeds)
    labelled = prepare_runs(model, clean, corrupted, names, clean_embeds=embeds)
    assert by_embeds.clean_tokens is None and by_embeds.label_tokens is by_embeds.corrupted_tokens
    assert labelled.label_tokens is labelled.corrupted_tokens and torch.equal(labelled.clean_tokens, clean)
    for runs in (by_embeds, labelled):
        assert torch.equal(runs.clean_final, by_tokens.clean_final)
        assert runs.clean_acts.keys() == by_tokens.clean_acts.keys()
        assert all(torch.equal(runs.clean_acts[k], by_tokens.clean_acts[k]) for k in names)
    sites = [Site(n, (p,)) for n in names for p in (5, 8, 11)]
    metric = kl_metric(by_tokens)
    assert torch.equal(run_sites(by_embeds, sites, metric, progress=False, skip_inert=False),
                       run_sites(by_tokens, sites, metric, progress=False, skip_inert=False))
    more = [get_act_name("mlp_out", 1)]  # recorded later from the embeddings, as from the tokens
    assert torch.equal(by_embeds.ensure(more).clean_acts[more[0]], by_tokens.ensure(more).clean_acts[more[0]])
    with pytest.raises(ValueError, match="tokens or text as `clean`, or input embeddings as `clean_embeds`"):
        prepare_runs(model, None, corrupted, names)
    with pytest.raises(ValueError, match=r"clean_embeds must be \[1, pos, 32\]"):
        prepare_runs(model, None, corrupted, names, clean_embeds=embeds[..., :-1])
    with pytest.raises(ValueError, match="equal lengths"):
        prepare_runs(model, None, corrupted, names, clean_embeds=embeds[:, :-1])
    with pytest.raises(ValueError, match="give the same run's tokens beside its embeddings"):
        prepare_runs(model, clean[:, :-1], corrupted, names, clean_embeds=embeds)


def test_a_labelled_sweep_over_latent_positions_labels_them_by_index(model, latent_pair):
    from hookedcot.interp import patch_layer_position

    clean, corrupted = latent_pair
    runs = prepare_runs(model, None, None, [get_act_name("resid_pre", 1)], clean_embeds=clean.embeds,
                        corrupted_embeds=corrupted.embeds)
    result = patch_layer_position(model, None, None, layers=[1], positions=clean.latent_positions, runs=runs, progress=False)
    assert result.labels["position"] == [str(p) for p in clean.latent_positions]


def test_a_latent_trace_is_a_cot_with_one_latent_step_per_position(smol_model):
    from hookedcot.cot import CoT
    from hookedcot.cot.attention import step_attention

    trace = generate_latent(smol_model, "Q: 3 + 4 = ?\nA:", 3, "argmax_embedding", end=" The answer is", max_new_tokens=3)
    cot = CoT.from_latent(trace, correct_answer="7")
    assert [s.tokens for s in cot.steps] == trace.step_spans() and all(s.kind == "latent" for s in cot.steps)
    assert [cot.text[slice(*s.chars)] for s in cot.steps] == ["<latent:0>", "<latent:1>", "<latent:2>"]
    assert cot.answer_text.startswith(" The answer is") and torch.equal(cot.embeds, trace.embeds)
    attention = step_attention(smol_model, cot)  # runs on the embeddings: latent positions have no token
    assert attention.matrix.shape[-2:] == (3, 3)
    with pytest.raises(ValueError, match="re-split"):
        cot.resplit("lines")
