"""HF checkpoint folders -> ConvertedCheckpoint: tensors map onto transformers' own weights, reads
are deferred, and broken folders fail before any data is read, naming the file or tensor (the
tensors against the model's parameters when from_pretrained builds it on the meta device)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hookedcot.conversions.safetensors_io as safetensors_io
from hookedcot.conversions import ConversionError
from hookedcot.conversions.registry import convert_hf_folder
from hookedcot import HookedCoT


def parameter_shapes(cfg) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {name: tuple(p.shape) for name, p in HookedCoT(cfg).named_parameters()}


def copy_checkpoint(src: Path, dst: Path, edit=None, dtype: torch.dtype | None = None) -> Path:
    """A single-file copy of `src` (sharded or not) whose tensor dict went through `edit`."""
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = {}
    for file in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(file))
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    if edit is not None:
        edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_tensors_are_transformers_weights_renamed(tiny_checkpoint, quirk, hf_model):
    converted = convert_hf_folder(tiny_checkpoint)
    state = hf_model(quirk).state_dict()
    expected = parameter_shapes(converted.config)
    assert set(converted.tensors) == set(expected)
    # every transformers parameter is used once, except lm_head when it is the tied embedding
    sources = {ref.source_name for ref in converted.tensors.values()}
    assert sources == set(state) - ({"lm_head.weight"} if converted.config.tie_embeddings else set())
    for ours, ref in converted.tensors.items():
        tensor = ref.load(torch.float32)
        assert ref.shape == expected[ours] == tuple(tensor.shape), ours
        assert torch.equal(tensor, state[ref.source_name]), ours
    assert converted.source_dtype == torch.float32 and not converted.unmapped
    assert converted.config.source == str(tiny_checkpoint)


def test_fixture_weights_are_not_defaults(tiny_checkpoints):
    """Norm weights must not be ones and biases not zeros, or a missing multiply/add goes unseen."""
    converted = convert_hf_folder(tiny_checkpoints["llama_bias"])
    for name, ref in converted.tensors.items():
        tensor = ref.load(torch.float32)
        if name.endswith("bias"):
            assert tensor.abs().min() > 0 and tensor.std() > 0.1, name
        if name.endswith(("ln1.weight", "ln2.weight", "ln_final.weight")):
            assert (tensor - 1).abs().max() > 0.3, name


def test_headers_only_until_load(tiny_checkpoints, monkeypatch):
    """convert_hf_folder reads no tensor data; each load reads exactly its tensor, once."""
    reads: list[str] = []
    real_read = safetensors_io.read_into

    def counting_read(file, offset, out, name):
        reads.append(name)
        return real_read(file, offset, out, name)

    monkeypatch.setattr(safetensors_io, "read_into", counting_read)
    converted = convert_hf_folder(tiny_checkpoints["llama_sharded"])
    assert reads == []
    ref = converted.tensors["blocks.2.attn.k_proj.weight"]
    assert ref.load(torch.float32).shape == (32, 64)
    assert reads == ["model.layers.2.self_attn.k_proj.weight"]


def test_reader_agrees_with_safetensors_library(tiny_checkpoints, tmp_path):
    """Our header parser and reads give exactly what safetensors' own loader gives, in every dtype."""
    bf16 = copy_checkpoint(tiny_checkpoints["llama_bias"], tmp_path / "bf16", dtype=torch.bfloat16)
    for folder in [*tiny_checkpoints.values(), bf16]:
        checkpoint = safetensors_io.SafetensorsCheckpoint.from_folder(folder)
        reference = {}
        for file in folder.glob("*.safetensors"):
            reference.update(load_file(file))
        assert checkpoint.infos.keys() == reference.keys()
        for name, tensor in reference.items():
            info = checkpoint.infos[name]
            assert (info.shape, info.dtype) == (tuple(tensor.shape), tensor.dtype), name
            assert torch.equal(checkpoint.read(name), tensor), name


def test_load_converts_dtype_and_returns_a_fresh_tensor(tiny_checkpoints):
    ref = convert_hf_folder(tiny_checkpoints["qwen2"]).tensors["blocks.0.attn.q_proj.bias"]
    full = ref.load(torch.float32)
    half = ref.load(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, full.to(torch.bfloat16))
    full.zero_()  # the caller owns what load returns: may wrap it as a Parameter without copying
    assert ref.load(torch.float32).abs().sum() > 0


def test_sharded_equals_unsharded(tiny_checkpoints, tmp_path):
    sharded_dir = tiny_checkpoints["llama_sharded"]
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_dir.glob("model-*.safetensors"))) >= 2
    sharded = convert_hf_folder(sharded_dir)
    single = convert_hf_folder(copy_checkpoint(sharded_dir, tmp_path / "single"))
    assert sharded.config == single.config.replace(model_name=sharded.config.model_name)
    assert sharded.tensors.keys() == single.tensors.keys()
    for name, ref in sharded.tensors.items():
        assert ref.shape == single.tensors[name].shape
        assert torch.equal(ref.load(torch.float32), single.tensors[name].load(torch.float32)), name


def test_source_dtype_is_the_majority_dtype(tiny_checkpoints, tmp_path):
    def norms_in_fp32(tensors):
        for name in tensors:
            if "norm" in name:
                tensors[name] = tensors[name].float()

    folder = copy_checkpoint(tiny_checkpoints["qwen2"], tmp_path / "bf16", norms_in_fp32, dtype=torch.bfloat16)
    converted = convert_hf_folder(folder)
    assert converted.source_dtype == torch.bfloat16
    assert converted.tensors["blocks.0.ln1.weight"].load(torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize(
    "quirk_name, edit, match",
    [
        ("qwen2", lambda t: t.pop("model.layers.1.mlp.up_proj.weight"),
         r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight \(-> blocks\.1\.mlp\.up_proj\.weight\)"),
        ("r1_distill_qwen", lambda t: t.pop("lm_head.weight"), r"missing tensors: lm_head\.weight \(-> unembed\.weight\)"),
        ("qwen2", lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}),
         r"unexpected tensors \(the config implies qkv_bias=True, o_bias=False.*\): model\.layers\.0\.self_attn\.o_proj\.bias"),
        ("llama_head_dim", lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}),
         r"unexpected tensors: model\.layers\.0\.extra\.weight"),
        ("llama_head_dim", lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(48, 64)}),
         r"model\.layers\.0\.self_attn\.k_proj\.weight \(-> blocks\.0\.attn\.k_proj\.weight\) has shape \[48, 64\] "
         r"in model\.safetensors, but the config implies \[64, 64\]"),
        ("smollm2_like", lambda t: t.update({"model.embed_tokens.weight": torch.zeros(280, 48)}),
         r"model\.embed_tokens\.weight .* has shape \[280, 48\] .* implies \[288, 48\]"),
        ("llama32", lambda t: t.update({"model.norm.weight": torch.zeros(64, dtype=torch.int8)}),
         r"model\.norm\.weight is stored as I8 .*only float16/bfloat16/float32"),
    ],
)
def test_mismatched_tensors_fail_naming_them(tiny_checkpoints, tmp_path, quirk_name, edit, match):
    folder = copy_checkpoint(tiny_checkpoints[quirk_name], tmp_path / "broken", edit)
    with pytest.raises(ConversionError, match=match) as err:
        HookedCoT.from_pretrained(folder)
    assert "re-download the checkpoint" in str(err.value) or "use the original weights" in str(err.value)  # the fix


def test_all_problems_reported_at_once(tiny_checkpoints, tmp_path):
    def break_two_ways(tensors):
        tensors.pop("model.layers.0.mlp.down_proj.weight")
        tensors["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 64)

    folder = copy_checkpoint(tiny_checkpoints["llama_bias"], tmp_path / "broken", break_two_ways)
    with pytest.raises(ConversionError, match=r"missing tensors: model\.layers\.0\.mlp\.down_proj.*model\.layers\.1\.mlp\.down_proj"):
        HookedCoT.from_pretrained(folder)


def test_the_check_runs_before_any_weight_is_read(tiny_checkpoints, tmp_path, monkeypatch):
    reads: list[str] = []
    monkeypatch.setattr(safetensors_io, "read_into", lambda file, offset, out, name: reads.append(name))
    folder = copy_checkpoint(tiny_checkpoints["qwen2"], tmp_path / "broken", lambda t: t.pop("model.norm.weight"))
    with pytest.raises(ConversionError, match=r"missing tensors: model\.norm\.weight \(-> ln_final\.weight\)"):
        HookedCoT.from_pretrained(folder)
    assert reads == []


def test_tolerated_extras(tiny_checkpoints, tmp_path):
    """A tied checkpoint that still stores lm_head, and rotary inv_freq buffers, are accepted and skipped."""
    def add_extras(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)

    folder = copy_checkpoint(tiny_checkpoints["llama32"], tmp_path / "extras", add_extras)
    converted = convert_hf_folder(folder)
    assert "unembed.weight" not in converted.tensors and not converted.unmapped
    assert {ref.source_name for ref in converted.tensors.values()} >= {"model.embed_tokens.weight"}
    assert HookedCoT.from_pretrained(folder).unembed.weight is not None


def _sharded_copy(tiny_checkpoints, tmp_path) -> Path:
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_checkpoints["llama_sharded"], folder)
    return folder


def test_missing_shard_file(tiny_checkpoints, tmp_path):
    folder = _sharded_copy(tiny_checkpoints, tmp_path)
    (folder / "model-00002-of-00012.safetensors").unlink()
    with pytest.raises(ConversionError, match=r"missing 1 of the 12 shard files .*model-00002-of-00012\.safetensors \(holds "):
        convert_hf_folder(folder)


def test_index_naming_absent_tensor(tiny_checkpoints, tmp_path):
    folder = _sharded_copy(tiny_checkpoints, tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.0.mlp.gate_proj.weight"] = "model-00012-of-00012.safetensors"
    index["weight_map"]["model.ghost.weight"] = "model-00001-of-00012.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"lists tensors its shards do not hold: .*gate_proj\.weight \(index says "
                                               r"model-00012-of-00012.*model\.ghost\.weight .*in no shard"):
        convert_hf_folder(folder)


def test_index_shard_outside_folder(tiny_checkpoints, tmp_path):
    folder = _sharded_copy(tiny_checkpoints, tmp_path)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=r"plain file names inside the checkpoint folder"):
        convert_hf_folder(folder)


def test_shards_without_index(tiny_checkpoints, tmp_path):
    folder = _sharded_copy(tiny_checkpoints, tmp_path)
    (folder / "model.safetensors.index.json").unlink()
    with pytest.raises(ConversionError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"):
        convert_hf_folder(folder)


def test_pickle_only_folder_is_never_unpickled(tiny_checkpoints, tmp_path, monkeypatch):
    folder = tmp_path / "bin_only"
    folder.mkdir()
    shutil.copy(tiny_checkpoints["qwen2"] / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not even a pickle")

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must not be called")

    monkeypatch.setattr(torch, "load", forbidden)
    with pytest.raises(ConversionError, match=r"(?s)only pickled weights \(pytorch_model\.bin\).*never unpickles.*"
                                               r"save_pretrained\(.*safe_serialization=True\)"):
        convert_hf_folder(folder)


def test_folder_problems(tiny_checkpoints, tmp_path):
    with pytest.raises(ConversionError, match=r"no config\.json"):
        convert_hf_folder(tmp_path)
    shutil.copy(tiny_checkpoints["qwen2"] / "config.json", tmp_path)
    with pytest.raises(ConversionError, match=r"no weights hookedcot can read.*config\.json"):
        convert_hf_folder(tmp_path)
    data = (tiny_checkpoints["qwen2"] / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"model\.safetensors is not a readable safetensors file"):
        convert_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConversionError, match=r"config\.json is not valid JSON"):
        convert_hf_folder(tmp_path)


def test_model_name_from_hub_cache_layout(tiny_checkpoints, tmp_path):
    folder = tmp_path / "models--deepseek-ai--DeepSeek-R1-Distill-Qwen-1.5B" / "snapshots" / "ad9f0ae0"
    shutil.copytree(tiny_checkpoints["r1_distill_qwen"], folder)
    assert convert_hf_folder(folder).config.model_name == "deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"
    assert convert_hf_folder(tiny_checkpoints["qwen2"]).config.model_name == "qwen2"


def test_folder_tokenizer_is_attached(tiny_checkpoints, tmp_path):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    assert convert_hf_folder(tiny_checkpoints["qwen2"]).tokenizer is None  # the fixtures carry none
    folder = tmp_path / "with_tokenizer"
    shutil.copytree(tiny_checkpoints["qwen2"], folder)
    backend = Backend(WordLevel({"<unk>": 0, "hello": 5, "world": 7}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    backend.save(str(folder / "tokenizer.json"))
    converted = convert_hf_folder(folder)
    assert converted.tokenizer is not None
    assert converted.tokenizer.encode("hello world", add_special_tokens=False) == [5, 7]
