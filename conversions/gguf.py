"""GGUF files (llama.cpp's format) -> ConvertedCheckpoint, dequantised tensor by tensor.

A GGUF carries its own config (metadata under llama.cpp's key names), the tokenizer, and the
weights, usually quantised. We read it with the `gguf` package (the reference reader and
dequantisers from llama.cpp's repository), translate the metadata into a `ModelConfig`, and hand
out one `TensorRef` per parameter: `load(dtype)` reads that tensor's bytes from the file a few rows
at a time and dequantises each chunk straight into the returned tensor, so loading holds one copy
of the weights plus a chunk in flight (the reader and its memory map are closed before any weight
is read).

Two llama.cpp transforms are undone here: shapes are stored innermost-first (we reverse them to
torch's [out, in]), and for the LLaMA architecture the rows of attn_q / attn_k are permuted to
llama.cpp's rotary layout (Qwen2 files are not permuted). LLaMA-3.1+ rope scaling is stored as a
`rope_freqs` tensor of per-frequency divisors, not as metadata; `gguf_config.py` recovers the
llama3 parameters from it (and the rest of the config from the metadata) and checks the recovery.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hookedcot.conversions import (
    ConversionError, ConvertedCheckpoint, SourceFormat, TensorNames, TensorRef, check_layer_count, check_tokenizer_fits,
    read_into,
)
from hookedcot.conversions.gguf_config import config_from_gguf, read_metadata
from hookedcot.conversions.gguf_layout import check_layout
from hookedcot.config import ModelConfig

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")

GGUF_NAMES = TensorNames(  # llama.cpp's names
    whole={"token_embd": "embed", "output_norm": "ln_final", "output": "unembed"},
    layer="blk.{}",
    parts={
        "attn_norm": "ln1",
        "ffn_norm": "ln2",
        "attn_q": "attn.q_proj",
        "attn_k": "attn.k_proj",
        "attn_v": "attn.v_proj",
        "attn_output": "attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    },
)
GGUF_FORMAT = SourceFormat(
    names=GGUF_NAMES,
    shapes_from="the metadata",
    fix="the file's tensors do not fit its own metadata: it is corrupt or written by a converter we do not know; "
    "download it again, or convert the HuggingFace checkpoint with llama.cpp's convert_hf_to_gguf.py",
)
_ROPE_FREQS = "rope_freqs.weight"
_CHUNK_VALUES = 1 << 18  # values dequantised per step: 1 MiB of float32


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in the file, copied out of the reader's index so the reader
    (its per-string numpy objects and its memory map) can be dropped before any weight is read."""

    name: str
    qtype: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: the innermost (block-quantised) dimension last
    offset: int  # absolute byte offset in the file
    nbytes: int

    @classmethod
    def of(cls, tensor: Any) -> "StoredTensor":
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        return cls(tensor.name, tensor.tensor_type, shape, int(tensor.data_offset), int(tensor.n_bytes))


def convert_gguf(path: str | Path) -> ConvertedCheckpoint:
    """Read a GGUF file's metadata and tensor index; no weight is dequantised until `load`.

    Raises ConversionError for a missing, truncated or corrupt file, an architecture other than
    llama / qwen2, or a tensor type the `gguf` package cannot dequantise. Whether the tensors fit
    the model `hookedcot.loading` checks against the meta-device model before any is read."""
    path = Path(path).expanduser()
    reader = open_reader(path)
    try:
        meta = read_metadata(reader)
    except Exception as exc:  # the gguf package's decoding of bytes the layout check let through
        raise ConversionError(f"{path}: the GGUF metadata is corrupt ({type(exc).__name__}: {exc}); download it again") from exc
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConversionError(
            f"{path.name}: GGUF architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
            "(LLaMA-3.x, SmolLM2 and R1-Distill-Llama files are 'llama'; Qwen2 / Qwen2.5 / R1-Distill-Qwen are 'qwen2')"
        )
    stored = {t.name: StoredTensor.of(t) for t in reader.tensors}
    del reader  # its per-string numpy objects and its memory map go before the tokenizer is built
    _check_tensor_types(path, list(stored.values()))
    shapes = {name: t.shape for name, t in stored.items()}
    rope_freqs = read_dequantised(path, stored[_ROPE_FREQS]).numpy().reshape(-1) if _ROPE_FREQS in stored else None
    cfg = config_from_gguf(meta, shapes, source=str(path), rope_freqs=rope_freqs)
    check_layer_count(cfg, stored, GGUF_NAMES, f"{arch}.block_count", path)
    tensors, unmapped = {}, []
    for name, tensor in stored.items():
        ours = GGUF_NAMES.ours(name)
        if ours is not None:
            tensors[ours] = _tensor_ref(path, tensor, ours, cfg, permute=(arch == "llama"))
        elif name != _ROPE_FREQS:
            unmapped.append(name)
    return ConvertedCheckpoint(
        config=cfg,
        tensors=tensors,
        format=GGUF_FORMAT,
        unmapped=unmapped,
        tokenizer=_build_tokenizer(meta, cfg, path),
        # Dequantised values are exact in float32 (transformers' GGUF loader also defaults to it).
        source_dtype=torch.float32,
    )


def _fast_reader_class() -> type:
    """`gguf.GGUFReader`, parsing through a plain-ndarray view of its memory map.

    The reader slices its `np.memmap` once per metadata item and each slice of a memmap builds a new
    memmap object, which makes large tokenizer vocabularies slow to read; a plain view of the same
    mapping (no copy, same bytes) does not."""
    from gguf import GGUFReader

    class FastGGUFReader(GGUFReader):
        @property
        def data(self) -> Any:
            return self._plain

        @data.setter
        def data(self, value: Any) -> None:
            self._mapping = value  # keeps the mapping alive
            self._plain = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return FastGGUFReader


def open_reader(path: Path) -> Any:
    """A `gguf.GGUFReader` over the file (memory-mapped), or a ConversionError saying what is wrong.

    The header's every count, size and tensor offset is checked against the file first
    (`gguf_layout.check_layout`): the reader trusts them, and a corrupt count would have it loop or
    allocate without bound, a corrupt offset hand out the wrong bytes as weights."""
    GGUFReader = _fast_reader_class()

    if not path.exists():
        raise ConversionError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise ConversionError(f"{path} is not a file; pass the path of a .gguf file")
    layout = check_layout(path)
    try:
        reader = GGUFReader(path, "r")
    except Exception as exc:  # anything the layout check let through that the reader still rejects
        raise ConversionError(
            f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc}). It may be truncated (an interrupted "
            "download), corrupt, or not a GGUF file at all; download it again or check the path."
        ) from exc
    found = [(t.name, int(t.data_offset), int(t.n_bytes)) for t in reader.tensors]
    if found != [(t.name, t.offset, t.nbytes) for t in layout.tensors]:  # two readers of one header must agree
        raise ConversionError(f"{path}: the gguf package reads a different tensor table than the header declares; "
                              "the file is corrupt - download it again")
    return reader


def _check_tensor_types(path: Path, tensors: list[StoredTensor]) -> None:
    """Reject, before any data is read, tensor types the installed gguf package cannot dequantise."""
    from gguf.constants import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    bad: dict[str, list[str]] = {}
    for qtype in {t.qtype for t in tensors}:
        block, size = GGML_QUANT_SIZES[qtype]
        try:
            dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
        except NotImplementedError:
            bad[qtype.name] = [t.name for t in tensors if t.qtype == qtype]
    if bad:
        import gguf

        listing = "; ".join(f"{name}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}" for name, names in bad.items())
        raise ConversionError(
            f"{path.name} holds tensors of types the installed gguf package ({getattr(gguf, '__version__', '?')}) cannot "
            f"dequantise ({listing}). Upgrade gguf (`pip install -U gguf`) or use a file quantised to a common type "
            "(F16, Q8_0, Q4_K_M, ...)."
        )


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of q/k rows (per head, interleaved rotary halves -> split halves)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _tensor_ref(path: Path, tensor: StoredTensor, ours: str, cfg: ModelConfig, permute: bool) -> TensorRef:
    heads = None
    if permute and ".attn.q_proj." in ours:
        heads = cfg.n_heads
    elif permute and ".attn.k_proj." in ours:
        heads = cfg.n_key_value_heads
    return TensorRef(tensor.name, tensor.shape, lambda dtype: read_dequantised(path, tensor, dtype, heads))


def read_dequantised(
    path: Path, tensor: StoredTensor, dtype: torch.dtype = torch.float32, heads: int | None = None,
    chunk_values: int = _CHUNK_VALUES,
) -> torch.Tensor:
    """The tensor dequantised into a new `dtype` tensor, about `chunk_values` values at a time,
    with llama.cpp's q/k row permutation undone over `heads` heads when given.

    Chunks, because whole-tensor dequantisation keeps the raw bytes' mapped pages and float32
    temporaries the size of the tensor alive, on top of the weights. Blocks are dequantised
    independently and the permutation stays inside a head, so chunks of whole rows (whole heads
    when permuted) give the same values bit for bit."""
    from gguf.quants import dequantize

    out = torch.empty(tensor.shape, dtype=dtype)
    if out.numel() == 0:
        return out
    if out.dim() == 1:  # norms and biases: small, read whole; q/k biases are permuted along their one axis
        raw = np.empty(tensor.nbytes, dtype=np.uint8)
        read_into(path, tensor.offset, raw, tensor.name)
        values = dequantize(raw, tensor.qtype).reshape(-1)
        out.copy_(torch.from_numpy(np.ascontiguousarray(unpermute_rows(values, heads) if heads else values)))
        return out
    rows = out.view(-1, tensor.shape[-1])
    row_bytes = tensor.nbytes // rows.shape[0]
    group = rows.shape[0] // heads if heads else 1  # rows per head: a chunk holds whole heads
    step = max(1, chunk_values // rows.shape[1] // group) * group
    raw = np.empty((min(step, rows.shape[0]), row_bytes), dtype=np.uint8)
    # float32 chunks are written by numpy: torch's copy_ wakes its thread pool on every call, slow
    # on a busy machine. Other dtypes need torch's cast.
    as_numpy = rows.numpy() if dtype == torch.float32 else None
    for start in range(0, rows.shape[0], step):
        n = min(step, rows.shape[0] - start)
        read_into(path, tensor.offset + start * row_bytes, raw[:n], tensor.name)
        values = dequantize(raw[:n], tensor.qtype)
        if heads:
            values = unpermute_rows(values, n // group)
        if as_numpy is not None:
            as_numpy[start : start + n] = values
        else:
            rows[start : start + n].copy_(torch.from_numpy(values))
    return out


def _build_tokenizer(meta: dict[str, Any], cfg: ModelConfig, path: Path) -> Any:
    """The file's tokenizer, or None when it has none or one of a kind we do not build (the weights
    still load without one). A byte-level BPE tokenizer that is there but corrupt is an error:
    dropping it silently would leave a model that cannot turn text into the right ids."""
    if "tokenizer.ggml.tokens" not in meta or meta.get("tokenizer.ggml.model") != "gpt2":
        return None
    from hookedcot.tokenizer import Tokenizer, TokenizerError

    try:
        tokenizer = Tokenizer.from_gguf(meta)
    except TokenizerError as exc:
        raise ConversionError(f"{path}: the tokenizer in the GGUF metadata cannot be built: {exc}") from exc
    check_tokenizer_fits(tokenizer, cfg, str(path))
    return tokenizer
