"""A model across devices: layer-wise placement maps, their validation, an automatic plan.

`from_pretrained(..., device_map=...)` takes accelerate's habit: a dict from module names to
devices, or "auto". The modules are the model's own: `embed` (alias `hook_embed`), `blocks.N`,
`blocks.A-B` (both ends included), `blocks` (all of them), `ln_final` and `unembed`:

    {"hook_embed": "cuda:0", "blocks.0-13": "cuda:0", "blocks.14-27": "cuda:1", "ln_final": "cuda:1"}

Every block must be placed exactly once (a gap or an overlap is an error naming the blocks);
`embed` defaults to block 0's device, `ln_final` to the last block's, `unembed` to `embed`'s:
the normed final residual travels back there (small: [batch, pos, d_model]), so logits are made
where the tokens are, `model.device`, and generation, sampling and losses see one device, as on
an unsplit model. A tied unembedding *is* the embedding: placing it elsewhere is refused. An
untied one may be mapped elsewhere; the forward then copies its logits back to `model.device`.

Placement is data (`Placement`): the loader streams each tensor to its device, and the forward
pass (model.py) moves the residual, the rotary tables and the mask only where one block's device
differs from the previous one's. Nothing here moves a tensor.

"auto" plans contiguous runs of blocks over the visible GPUs, balanced by free memory
(`plan_auto`, testable with made-up capacities); without GPUs it is "cpu". It is 40 lines rather
than accelerate's `infer_auto_device_map`, whose module tree and tied-weight rules we would have
to translate back into these names.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from hookedcot.config import ModelConfig
from hookedcot.errors import HookedCoTError

DeviceMap = Mapping[str, "str | int | torch.device"]
AUTO_FRACTION = 0.9  # of each GPU's free memory that "auto" fills with weights
_BLOCKS = re.compile(r"^blocks(?:\.(\d+)(?:-(\d+))?)?$")
_ALIASES = {"hook_embed": "embed", "embed": "embed", "ln_final": "ln_final", "unembed": "unembed",
            "lm_head": "unembed", "hook_unembed": "unembed"}


class DeviceMapError(HookedCoTError, ValueError):
    """A device map that does not place the model's modules exactly once."""


@dataclass(frozen=True)
class Placement:
    """Where each module of a model lives. `blocks[i]` is block i's device."""

    embed: torch.device
    blocks: tuple[torch.device, ...]
    ln_final: torch.device
    unembed: torch.device

    @property
    def devices(self) -> list[torch.device]:
        """The distinct devices, in forward order."""
        return list(dict.fromkeys([self.embed, *self.blocks, self.ln_final, self.unembed]))

    @property
    def is_split(self) -> bool:
        return len(self.devices) > 1

    def device_of(self, param_name: str) -> torch.device:
        """The device of a parameter or buffer named as in `model.named_parameters()`."""
        head = param_name.split(".", 1)[0]
        if head == "blocks":
            return self.blocks[int(param_name.split(".")[1])]
        if head in ("embed", "ln_final", "unembed"):
            return getattr(self, head)
        if head == "inv_freq":
            return self.embed
        raise DeviceMapError(f"no placement for {param_name!r}: it is not under embed, blocks, ln_final or unembed")

    def to_dict(self) -> dict[str, str]:
        """The compact map (runs of blocks merged) that `parse_device_map` reads back to this placement."""
        out = {"embed": str(self.embed)}
        start = 0
        for i in range(1, len(self.blocks) + 1):
            if i == len(self.blocks) or self.blocks[i] != self.blocks[start]:
                out[f"blocks.{start}" if i - 1 == start else f"blocks.{start}-{i - 1}"] = str(self.blocks[start])
                start = i
        return {**out, "ln_final": str(self.ln_final), "unembed": str(self.unembed)}


def parse_device_map(device_map: DeviceMap, cfg: ModelConfig) -> Placement:
    """Validate a map against a model's config and fill its defaults (module docstring). Devices
    are parsed, not looked up: "cuda:5" is a valid name on a machine without it (`check_available`
    says whether this machine has it)."""
    if not isinstance(device_map, Mapping):
        raise DeviceMapError(f"device_map must be a dict of module -> device, or 'auto'; got {type(device_map).__name__}")
    n = cfg.n_layers
    owner: dict[int, str] = {}
    named: dict[str, torch.device] = {}
    unknown, overlaps, outside = [], [], []
    for key, dev in device_map.items():
        device = _device(key, dev)
        match = _BLOCKS.match(str(key))
        if match:
            lo = 0 if match.group(1) is None else int(match.group(1))
            hi = n - 1 if match.group(1) is None else int(match.group(2) or match.group(1))
            if hi < lo or hi >= n:
                outside.append(f"{key!r} (the model has blocks 0-{n - 1})")
                continue
            for layer in range(lo, hi + 1):
                if layer in owner:
                    overlaps.append(f"block {layer} is in {owner[layer]!r} and {key!r}")
                owner[layer] = key
                named[f"blocks.{layer}"] = device
        elif key in _ALIASES:
            name = _ALIASES[key]
            if name in named:
                overlaps.append(f"{name} is placed twice (as {key!r} and an alias of it)")
            named[name] = device
        else:
            unknown.append(repr(key))
    problems = []
    if unknown:
        problems.append(f"unknown modules {', '.join(unknown)}: use embed (or hook_embed), blocks.N, blocks.A-B, "
                        "blocks, ln_final, unembed")
    if outside:
        problems.append("blocks out of range: " + ", ".join(outside))
    problems += overlaps
    missing = [layer for layer in range(n) if layer not in owner]
    if missing:
        problems.append(f"blocks {_ranges(missing)} are placed nowhere (a gap): every block 0-{n - 1} needs a device")
    if problems:
        raise DeviceMapError("bad device_map: " + "; ".join(problems))
    blocks = tuple(named[f"blocks.{layer}"] for layer in range(n))
    embed = named.get("embed", blocks[0])
    ln_final = named.get("ln_final", blocks[-1])
    if cfg.tie_embeddings and named.get("unembed", embed) != embed:
        raise DeviceMapError(
            f"{cfg.model_name or 'this model'} ties its unembedding to the embedding, so unembed lives where embed "
            f"does ({embed}); drop 'unembed' from the map or place it on {embed} (the final residual moves there)"
        )
    return Placement(embed, blocks, ln_final, named.get("unembed", embed))


def resolve_device_map(device_map: DeviceMap | str, cfg: ModelConfig, param_bytes: Mapping[str, int]) -> Placement:
    """A map or "auto" (planned over this machine's GPUs, else the CPU) as a `Placement`, checked
    to name devices this machine has."""
    if isinstance(device_map, str):
        if device_map not in ("auto", "balanced"):
            raise DeviceMapError(f"device_map={device_map!r}: pass 'auto' or a dict such as "
                                 "{'embed': 'cuda:0', 'blocks.0-13': 'cuda:0', 'blocks.14-27': 'cuda:1', 'ln_final': 'cuda:1'}")
        placement = plan_auto(cfg, param_bytes, gpu_capacities())
    else:
        placement = parse_device_map(device_map, cfg)
    check_available(placement)
    return placement


def gpu_capacities() -> dict[str, int]:
    """Bytes "auto" may fill on each visible GPU (AUTO_FRACTION of what is free now); empty without GPUs."""
    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": int(torch.cuda.mem_get_info(i)[0] * AUTO_FRACTION) for i in range(torch.cuda.device_count())}


def module_bytes(param_bytes: Mapping[str, int], cfg: ModelConfig) -> tuple[int, list[int], int, int]:
    """(embed, [block i], ln_final, unembed) bytes from {parameter name: bytes}; a tied unembedding costs nothing extra."""
    blocks = [0] * cfg.n_layers
    other = {"embed": 0, "ln_final": 0, "unembed": 0}
    for name, size in param_bytes.items():
        head = name.split(".", 1)[0]
        if head == "blocks":
            blocks[int(name.split(".")[1])] += size
        elif head in other:
            other[head] += size
    unembed = 0 if cfg.tie_embeddings else other["unembed"]
    return other["embed"], blocks, other["ln_final"], unembed


def plan_auto(cfg: ModelConfig, param_bytes: Mapping[str, int], capacities: Mapping[str, int]) -> Placement:
    """Contiguous runs of blocks over `capacities` ({device: bytes}, in order), each device's share
    of the weights proportional to its capacity (balanced, as accelerate's "balanced"), never over
    it. The embedding and the unembedding go on the first device (logits are made where the tokens
    are), the final norm with the last block. No capacities: everything on the CPU."""
    if not capacities:
        return parse_device_map({"blocks": "cpu", "embed": "cpu", "ln_final": "cpu"}, cfg)
    embed, blocks, ln_final, unembed = module_bytes(param_bytes, cfg)
    total = embed + sum(blocks) + ln_final + unembed
    names, caps = list(capacities), [int(capacities[d]) for d in capacities]
    if total > sum(caps):
        raise DeviceMapError(
            f"the weights need {_size(total)} but the devices have {_size(sum(caps))} free for them "
            f"({', '.join(f'{d}: {_size(c)}' for d, c in capacities.items())}); use a smaller dtype, more "
            "devices, or a dict device_map that puts some blocks on 'cpu'"
        )
    shares = [total * c / sum(caps) for c in caps]
    used, dev, placed = [0] * len(caps), 0, []
    used[0] = embed + unembed
    tail = ln_final
    for layer, size in enumerate(blocks):
        last = layer == len(blocks) - 1
        need = size + (tail if last else 0)
        while dev < len(caps) - 1:
            full = used[dev] + need > caps[dev]
            # a device that holds blocks already takes this one only if its middle falls within its share
            past_share = bool(placed) and placed[-1] == names[dev] and used[dev] + need / 2 > shares[dev]
            if not (full or past_share):
                break
            dev += 1
        if used[dev] + need > caps[dev]:
            raise DeviceMapError(f"block {layer} ({_size(size)}) fits on no device after the earlier blocks; "
                                 "free memory on the devices or pass a dict device_map")
        used[dev] += need
        placed.append(names[dev])
    spec = {"embed": names[0], "ln_final": placed[-1]} | {f"blocks.{i}": d for i, d in enumerate(placed)}
    return parse_device_map(spec, cfg)


def check_available(placement: Placement) -> None:
    """Raise naming the devices of `placement` this machine does not have."""
    missing = []
    for device in placement.devices:
        if device.type == "cuda":
            count = torch.cuda.device_count() if torch.cuda.is_available() else 0
            if (device.index or 0) >= count:
                missing.append(f"{device} (this machine has {count} CUDA device{'s' * (count != 1)})")
        elif device.type not in ("cpu", "meta"):
            backend = getattr(torch, device.type, None)
            if backend is None or not backend.is_available():
                missing.append(f"{device} (no {device.type} backend here)")
    if missing:
        raise DeviceMapError(f"device_map names devices this machine lacks: {', '.join(missing)}")


def on_device(x: Tensor, device: torch.device) -> Tensor:
    """`x` on `device`, not copied when it is already there."""
    return x if x.device == device else x.to(device, non_blocking=device.type == "cuda")


def to_block_device(device: torch.device, resid: Tensor, rope: tuple[Tensor, Tensor], mask: Any) -> tuple[Tensor, tuple, Any]:
    """What a block reads, on its device: the residual, the rotary tables and the attention mask
    (any mask object; its tensor attributes are moved, one copy per boundary crossed). Called at
    every block of a split model; returns its inputs untouched when they are already there."""
    elsewhere = {k: v for k, v in vars(mask).items() if isinstance(v, Tensor) and v.device != device}
    if resid.device == device and rope[0].device == device and not elsewhere:
        return resid, rope, mask
    moved = copy.copy(mask) if elsewhere else mask
    for name, value in elsewhere.items():
        setattr(moved, name, on_device(value, device))
    return on_device(resid, device), tuple(on_device(t, device) for t in rope), moved


def _device(key: Any, dev: Any) -> torch.device:
    try:
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    except (RuntimeError, TypeError) as exc:
        raise DeviceMapError(f"device_map[{key!r}] = {dev!r} is not a device: use 'cpu', 'cuda:N' or an int N") from exc


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _ranges(layers: list[int]) -> str:
    out, start = [], layers[0]
    for a, b in zip(layers, layers[1:] + [None]):
        if b != a + 1:
            out.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ", ".join(out)


def place_model(model: Any, device_map: DeviceMap | str) -> Any:
    """Move an already built model's modules to the devices of `device_map` (in place; returns the
    model). Loading with `from_pretrained(..., device_map=)` does this without a first full copy;
    this is for models built in memory (and for tests)."""
    elem = {n: p.numel() * p.element_size() for n, p in model.named_parameters()}
    placement = resolve_device_map(device_map, model.cfg, elem)
    model.embed.to(placement.embed)
    for block, device in zip(model.blocks, placement.blocks):
        block.to(device)
    model.ln_final.to(placement.ln_final)
    model.unembed.to(placement.unembed)
    model.inv_freq = model.inv_freq.to(placement.embed)
    model.placement = placement if placement.is_split else None
    if hasattr(model, "_sync_cfg_device"):
        model._sync_cfg_device()
    return model
