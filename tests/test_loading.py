"""from_pretrained's resolution and its errors: every message names the problem and the fix."""

from __future__ import annotations

import pytest
import torch

from hookedcot.conversions import ConversionError
from hookedcot import HookedCoT
from hookedcot.loading import parse_dtype


def test_unreachable_hub_says_so_and_shows_the_local_folder_way(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConversionError) as err:
        HookedCoT.from_pretrained("Qwen/Qwen2-1.5B")
    msg = str(err.value)
    assert "Qwen/Qwen2-1.5B" in msg and "HF_HUB_OFFLINE" in msg and "from_pretrained('./Qwen2-1.5B')" in msg


def test_paths_that_are_nothing_are_named():
    with pytest.raises(FileNotFoundError, match="neither an existing file or folder"):
        HookedCoT.from_pretrained("./no/such/folder")
    with pytest.raises(FileNotFoundError, match="smollm2-135m-instruct"):
        HookedCoT.from_pretrained("not-a-model")


def test_a_file_that_is_not_gguf(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 16)
    with pytest.raises(ConversionError, match="not a .gguf file"):
        HookedCoT.from_pretrained(f)


def test_unsupported_model_type_lists_the_supported(tiny_checkpoints, tmp_path):
    import json
    import shutil

    folder = tmp_path / "gpt2ish"
    shutil.copytree(tiny_checkpoints["qwen2"], folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "mistral"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception) as err:
        HookedCoT.from_pretrained(folder)
    assert "mistral" in str(err.value) and "qwen2" in str(err.value) and "llama" in str(err.value)


def test_dtypes():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype("torch.float32") is torch.float32
    with pytest.raises(ValueError, match="bfloat16"):
        parse_dtype("float8")


def test_loaded_model_is_eval_tied_and_takes_gradients(tiny_checkpoints):
    model = HookedCoT.from_pretrained(tiny_checkpoints["qwen2"], dtype="bfloat16")
    assert not model.training and model.dtype is torch.bfloat16
    # As in TransformerLens and transformers (issue 14); no gradient buffers until a backward.
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert model.unembed.weight is model.embed.weight
    assert not any(p.is_meta for p in model.parameters()) and not model.inv_freq.is_meta
