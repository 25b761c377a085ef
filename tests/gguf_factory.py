"""Tiny GGUF files for tests, written with the `gguf` package the way llama.cpp's converter writes them.

A tiny byte-level BPE vocabulary (trained here, ~330 tokens, with control and user-defined tokens,
one of them spelled outside the byte alphabet as R1-Distill's are), tiny random LLaMA / Qwen2
models from transformers, and `write_gguf`, which stores a model's weights in any tensor type `gguf.quants` can quantise, with llama.cpp's q/k
row permutation for the LLaMA architecture and, optionally, a `rope_freqs` tensor for llama3 rope.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TRAIN_TEXT = [
    "The quick brown fox jumps over the lazy dog. Then the dog sleeps; the fox thinks about 12 + 30 = 42.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5",
    "Question: how many apples are there? Answer: there are 7 apples, so the answer is 7.",
    "Les élèves étudient. Der Hund läuft schnell. 日本語のテキストです。 Emoji 🙂🚀 and tabs\tand  spaces.",
]


def tiny_vocab() -> dict[str, Any]:
    """tokenizer.ggml.* metadata for a small byte-level BPE vocabulary, keyed like a GGUF file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_TRAIN_TEXT * 4, trainer)
    import json

    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    types = [1] * len(tokens)
    # control (3), user-defined (4), and a control token outside the byte alphabet (like <｜User｜>)
    for token, kind in [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<think>", 4), ("</think>", 4),
                        ("<|中文|>", 3)]:
        tokens.append(token)
        types.append(kind)
    n = len(tokens)
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.bos_token_id": n - 5,
        "tokenizer.ggml.eos_token_id": n - 4,
        "tokenizer.ggml.padding_token_id": n - 6,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }


def tiny_hf_model(arch: str, vocab_size: int, d_model: int = 64, d_mlp: int = 128, n_layers: int = 2, seed: int = 0, **extra: Any):
    """A random transformers LLaMA / Qwen2 model, weights redrawn at unit-ish scale (norms too)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    kwargs = dict(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_mlp, num_hidden_layers=n_layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096)
    if arch == "llama":
        config = LlamaConfig(**{**kwargs, "rope_theta": 5e5, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, **extra})
        model_cls = LlamaForCausalLM
    else:
        config = Qwen2Config(**{**kwargs, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "tie_word_embeddings": True, **extra})
        model_cls = Qwen2ForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = 0.2 if name.endswith("bias") else 1.0 / math.sqrt(param.shape[-1])
            param.copy_(torch.randn_like(param) * scale + (1.0 if "norm" in name else 0.0))
    return model


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py `LlamaModel.permute` (HF rotary halves -> interleaved)."""
    return weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_freqs(head_dim: int, theta: float, factor: float, low: float, high: float, original: int) -> np.ndarray:
    """llama.cpp's `generate_extra_tensors` for llama3 rope scaling: one divisor per frequency."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_wavelen, high_wavelen = original / low, original / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_HF_TO_GGUF[module]}.{kind}"


def gguf_tensors(model: Any, arch: str) -> dict[str, np.ndarray]:
    """GGUF name -> float32 array in torch order, permuted as llama.cpp stores LLaMA q/k."""
    cfg = model.config
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        array = tensor.detach().float().numpy().copy()
        gname = gguf_name(name)
        if arch == "llama" and ".attn_q." in gname:
            array = llama_cpp_permute(array, cfg.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gname:
            array = llama_cpp_permute(array, cfg.num_key_value_heads)
        out[gname] = array
    return out


def write_gguf(
    path: Path,
    arch: str,
    config: Any,
    tensors: dict[str, np.ndarray],
    vocab: dict[str, Any],
    qtype: Any = None,
    kv: dict[str, Any] | None = None,
    raw: dict[str, tuple[np.ndarray, Any]] | None = None,
) -> Path:
    """Write a GGUF: metadata from a transformers config, 2-D tensors quantised to `qtype` (1-D ones
    stay F32, as llama.cpp keeps norms and biases), `raw` tensors written as given (bytes, type)."""
    import gguf

    qtype = qtype if qtype is not None else gguf.GGMLQuantizationType.F32
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    if arch == "llama":
        writer.add_rope_dimension_count(config.head_dim)
    _add_tokenizer(writer, vocab)
    for key, value in (kv or {}).items():
        writer.add_key_value(key, value[0], value[1])
    for name, array in tensors.items():
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, array.astype(np.float32))
    for name, (data, dtype) in (raw or {}).items():
        writer.add_tensor(name, data, raw_dtype=dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer: Any, vocab: dict[str, Any]) -> None:
    writer.add_tokenizer_model(vocab["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(vocab["tokenizer.ggml.pre"])
    writer.add_token_list(vocab["tokenizer.ggml.tokens"])
    writer.add_token_types(vocab["tokenizer.ggml.token_type"])
    writer.add_token_merges(vocab["tokenizer.ggml.merges"])
    for key, add in [("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("padding_token_id", writer.add_pad_token_id), ("eot_token_id", writer.add_eot_token_id),
                     ("add_bos_token", writer.add_add_bos_token), ("add_eos_token", writer.add_add_eos_token)]:
        if f"tokenizer.ggml.{key}" in vocab:
            add(vocab[f"tokenizer.ggml.{key}"])
    if vocab.get("tokenizer.chat_template") is not None:
        writer.add_chat_template(vocab["tokenizer.chat_template"])


def quantizable_types() -> list[Any]:
    """Every tensor type `gguf.quants.quantize` implements (checked by trying it)."""
    import gguf

    found = []
    for qtype in gguf.GGMLQuantizationType:
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.quantize(np.zeros((1, 256 * block), dtype=np.float32), qtype)
        except (NotImplementedError, gguf.quants.QuantError, ValueError, TypeError):
            continue
        found.append(qtype)
    return found


def dequantizable_types() -> list[Any]:
    """Every tensor type `gguf.quants.dequantize` implements."""
    import gguf

    found = []
    for qtype in gguf.GGMLQuantizationType:
        _, size = gguf.GGML_QUANT_SIZES[qtype]
        try:
            gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
        except (NotImplementedError, ValueError, TypeError):
            continue
        found.append(qtype)
    return found
