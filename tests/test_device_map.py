"""Device maps without GPUs. What each test exercises, honestly:

- the parser/validator and the "auto" planner, on made-up "cuda:N" names and capacities (nothing
  is moved: placement is data);
- loading with a map that puts some modules on "meta": every tensor lands on its module's device
  as it is read (meta tensors hold no data, so the blocks mapped there were never copied to host
  memory as part of the model), and a split forward on it runs the real block-boundary moves —
  hooks see their block's device — though meta computes shapes, not numbers;
- the numbers of the split code path with every entry "cpu": the placement is forced on and each
  KV cache is spread into per-layer buffers (`LayerStack`) exactly as on several GPUs, then
  logits, a cache recorded with device="cpu", a patching sweep, greedy generation and sampled
  rollouts must equal an unsplit model's bit for bit. What no CPU test can show is a real
  cross-device copy (cuda:0 -> cuda:1).
"""

from __future__ import annotations

import pytest
import torch

import hookedcot.model
from hookedcot import HookedCoT, ModelConfig
from hookedcot.cot.rollouts import sample_rollouts
from hookedcot.device_map import (
    DeviceMapError, Placement, check_available, parse_device_map, place_model, plan_auto, resolve_device_map,
)
from hookedcot.interp.sweeps import patch_layer_position
from hookedcot.placed_cache import LayerStack
from model_factory import CharTokenizer, random_model

CFG28 = ModelConfig(n_layers=28, d_model=64, n_heads=4, n_key_value_heads=2, d_head=16, d_mlp=128, d_vocab=100,
                    tie_embeddings=False)
ISSUE_MAP = {"hook_embed": "cuda:0", "blocks.0-13": "cuda:0", "blocks.14-27": "cuda:1", "ln_final": "cuda:1"}
CPU, META = torch.device("cpu"), torch.device("meta")


def _bytes(cfg, per_block=100, embed=1000, unembed=1000):
    out = {"embed.weight": embed, "ln_final.weight": 1, "unembed.weight": unembed}
    return out | {f"blocks.{i}.mlp.up_proj.weight": per_block for i in range(cfg.n_layers)}


# ------------------------------------------------------------------ parsing and validation
def test_the_issues_map_places_embedding_blocks_and_final_norm_where_it_says():
    p = parse_device_map(ISSUE_MAP, CFG28)
    cuda0, cuda1 = torch.device("cuda:0"), torch.device("cuda:1")
    assert p.embed == cuda0 and p.blocks == (cuda0,) * 14 + (cuda1,) * 14
    assert p.ln_final == cuda1 and p.unembed == cuda0  # logits are made where the tokens are
    assert p.device_of("blocks.13.attn.q_proj.weight") == cuda0 and p.device_of("blocks.14.ln1.weight") == cuda1
    assert parse_device_map(p.to_dict(), CFG28) == p and p.is_split


def test_a_tied_unembedding_stays_with_the_embedding_and_an_untied_one_may_go_elsewhere():
    tied = CFG28.replace(tie_embeddings=True)
    assert parse_device_map(ISSUE_MAP, tied).unembed == torch.device("cuda:0")
    with pytest.raises(DeviceMapError, match="ties its unembedding"):
        parse_device_map(ISSUE_MAP | {"unembed": "cuda:1"}, tied)
    assert parse_device_map(ISSUE_MAP | {"lm_head": "cuda:1"}, CFG28).unembed == torch.device("cuda:1")


@pytest.mark.parametrize("bad, message", [
    ({"blocks.0-27": "cpu", "lm_hed": "cpu"}, r"unknown modules 'lm_hed'"),
    ({"blocks.0-12": "cuda:0", "blocks.15-27": "cuda:1"}, r"blocks 13-14 are placed nowhere \(a gap\)"),
    ({"blocks.0-14": "cuda:0", "blocks.14-27": "cuda:1"}, r"block 14 is in 'blocks.0-14' and 'blocks.14-27'"),
    ({"blocks.0-30": "cpu"}, r"'blocks.0-30' \(the model has blocks 0-27\)"),
    ({"blocks": "cpu", "embed": "cpu", "hook_embed": "cpu"}, r"embed is placed twice"),
    ({"blocks": "gpu:0"}, r"device_map\['blocks'\] = 'gpu:0' is not a device"),
])
def test_a_bad_map_is_refused_naming_what_is_wrong(bad, message):
    with pytest.raises(DeviceMapError, match=message):
        parse_device_map(bad, CFG28)


def test_ints_are_cuda_indices_and_blocks_alone_means_every_block():
    p = parse_device_map({"blocks": 1, "embed": "cpu"}, CFG28)
    assert set(p.blocks) == {torch.device("cuda:1")} and p.embed == CPU


def test_a_map_naming_a_gpu_this_machine_lacks_is_refused_at_load():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(DeviceMapError, match=f"cuda:{count}"):
        check_available(parse_device_map({"blocks": f"cuda:{count}"}, CFG28))


# ------------------------------------------------------------------ the "auto" plan
def test_auto_splits_contiguous_blocks_in_proportion_to_free_memory():
    sizes = _bytes(CFG28)
    even = plan_auto(CFG28, sizes, {"cuda:0": 10_000, "cuda:1": 10_000})
    n0 = even.blocks.count(torch.device("cuda:0"))
    assert even.blocks == (torch.device("cuda:0"),) * n0 + (torch.device("cuda:1"),) * (28 - n0)
    assert abs((2000 + 100 * n0) - (100 * (28 - n0) + 1)) <= 100  # balanced within one block
    uneven = plan_auto(CFG28, sizes, {"cuda:0": 3000, "cuda:1": 10_000})
    assert 2000 + 100 * uneven.blocks.count(torch.device("cuda:0")) <= 3000
    assert uneven.embed == uneven.unembed == torch.device("cuda:0") and uneven.ln_final == torch.device("cuda:1")


def test_auto_without_gpus_is_the_cpu_and_too_little_memory_is_an_error_with_the_sizes():
    assert set(plan_auto(CFG28, _bytes(CFG28), {}).devices) == {CPU}
    with pytest.raises(DeviceMapError, match=r"need .* but the devices have"):
        plan_auto(CFG28, _bytes(CFG28), {"cuda:0": 1000, "cuda:1": 1000})
    if not torch.cuda.is_available():
        assert set(resolve_device_map("auto", CFG28, _bytes(CFG28)).devices) == {CPU}


# ------------------------------------------------------------------ loading onto several devices
META_MAP = {"embed": "cpu", "blocks.0": "cpu", "blocks.1-2": "meta", "ln_final": "meta"}


def test_loading_streams_each_tensor_to_its_modules_device(tiny_checkpoints):
    model = HookedCoT.from_pretrained(tiny_checkpoints["r1_distill_qwen"], device_map=META_MAP)  # 3 layers, untied
    expected = parse_device_map(META_MAP, model.cfg)
    for name, p in model.named_parameters():
        assert p.device == expected.device_of(name), name
    assert model.placement == expected and model.device == CPU
    assert not any(p.is_meta for n, p in model.named_parameters() if n.startswith(("embed", "blocks.0.")))


def test_a_split_forward_moves_the_residual_at_the_block_boundary_and_hooks_see_their_blocks_device(tiny_checkpoints):
    model = HookedCoT.from_pretrained(tiny_checkpoints["r1_distill_qwen"], device_map=META_MAP)
    seen = {}
    hooks = [(lambda n: n.endswith(("resid_pre", "resid_post", "hook_pattern", "hook_k")) or n.startswith("ln_final"),
              lambda x, h: seen.__setitem__(h.name, x.device))]
    # no logits: they would be made on the embedding's device, and meta tensors cannot be copied out
    model.run_with_hooks(torch.tensor([[5, 9, 2, 7]]), attention_mask=torch.tensor([[0, 1, 1, 1]]), fwd_hooks=hooks,
                         return_type=None)
    assert seen["ln_final.hook_normalized"] == META
    for name, device in seen.items():
        layer = int(name.split(".")[1]) if name.startswith("blocks") else None
        assert device == (META if layer is None or layer >= 1 else CPU), name
    assert seen["blocks.0.hook_resid_post"] == CPU and seen["blocks.1.hook_resid_pre"] == META


def test_a_residual_on_a_later_blocks_device_starts_there_with_its_mask_and_positions():
    model = place_model(random_model(CFG), {"blocks.0-1": "cpu", "blocks.2-3": "meta"})
    resid = torch.empty(1, 5, CFG.d_model, device=META)  # e.g. a patching run restarting at block 2
    out = model(resid, start_at_layer=2, stop_at_layer=4, attention_mask=torch.tensor([[0, 1, 1, 1, 1]]))
    assert out.device == META and out.shape == (1, 5, CFG.d_model)


def test_device_and_device_map_together_are_refused(tiny_checkpoints):
    with pytest.raises(ValueError, match="device or device_map"):
        HookedCoT.from_pretrained(tiny_checkpoints["qwen2"], device="cpu", device_map={"blocks": "cpu"})


def test_an_all_cpu_map_loads_the_same_model(tiny_checkpoints):
    path = tiny_checkpoints["llama_sharded"]
    plain, mapped = HookedCoT.from_pretrained(path), HookedCoT.from_pretrained(path, device_map={"blocks": "cpu"})
    tokens = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    assert mapped.placement is None and torch.equal(plain(tokens), mapped(tokens))


# ------------------------------------------------------------------ the split path's numbers, all on the CPU
CFG = ModelConfig(n_layers=4, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=128,
                  tie_embeddings=False)


@pytest.fixture
def split_on_cpu(monkeypatch):
    """(whole model, the same weights run through the split path): placement forced on, every KV
    cache spread into per-layer buffers as it would be over GPUs."""
    whole, split = random_model(CFG, tokenizer=CharTokenizer()), random_model(CFG, tokenizer=CharTokenizer())
    place_model(split, {"blocks.0-1": "cpu", "blocks.2-3": "cpu"})
    split.placement = Placement(CPU, (CPU,) * 4, CPU, CPU)
    spread = []

    def place_every_cache(past, devices):
        for name in ("keys", "values", "prefix_keys", "prefix_values"):
            buf = getattr(past, name, None)
            if isinstance(buf, torch.Tensor):
                setattr(past, name, LayerStack([buf[i].clone() for i in range(len(devices))]))
                spread.append(name)

    monkeypatch.setattr(hookedcot.model, "place_cache", place_every_cache)
    return whole, split, spread


def test_the_split_path_gives_the_same_logits_and_cache(split_on_cpu):
    whole, split, _ = split_on_cpu
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    out_w, cache_w = whole.run_with_cache(tokens)
    out_s, cache_s = split.run_with_cache(tokens, device="cpu")
    assert torch.equal(out_w, out_s)
    assert cache_w.keys() == cache_s.keys() and all(torch.equal(cache_w[k], cache_s[k]) for k in cache_w.keys())
    assert torch.equal(whole(tokens, return_type="loss"), split(tokens, return_type="loss"))


def test_the_split_path_gives_the_same_patching_sweep_generation_and_rollouts(split_on_cpu):
    whole, split, spread = split_on_cpu
    clean, corrupted = "The cat sat on the mat", "The dog sat on the hat"
    a = patch_layer_position(whole, clean, corrupted, progress=False)
    b = patch_layer_position(split, clean, corrupted, progress=False)
    assert torch.equal(a.values, b.values) and float(a.values.abs().max()) > 0
    assert whole.generate("Hello", max_new_tokens=8, do_sample=False) == split.generate("Hello", max_new_tokens=8, do_sample=False)
    with pytest.raises(ValueError, match="needs the model on one device"):  # a fixed-shape cache is one device's
        split.generate("Hello", max_new_tokens=2, decode="static")
    kw = dict(temperature=0.9, top_p=0.95, max_new_tokens=6, stop_at_eos=False, seed=2, progress=False)
    prefix = [ord(c) for c in "Q: 2+2? A:"]
    assert sample_rollouts(whole, prefix, 5, **kw) == sample_rollouts(split, prefix, 5, **kw)
    # the patching, generation and rollout caches ran on per-layer buffers (the rollouts'
    # shared-prefix cache is built from its prefix cache's, already spread: `LayerStack.new_empty`);
    # generation on a split model takes the eager loop, whose cache can be spread
    assert spread.count("keys") == spread.count("values") >= 3


def test_a_split_model_gathered_onto_one_device_forgets_its_placement():
    model = random_model(CFG)
    model.placement = Placement(CPU, (CPU,) * 4, CPU, CPU)
    model.to("cpu")
    assert model.placement is None
