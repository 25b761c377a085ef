"""The ranks of a `torchrun` job, a deterministic share of the work for each, and rank 0's gather.

Nothing here is a cluster layer: the process group is torch.distributed's, started from the
environment torchrun (or `srun torchrun`) sets (RANK, WORLD_SIZE, MASTER_ADDR, ...). Objects
travel over a gloo group (pickled), also when the tensors' backend is NCCL, so results reach rank
0 exactly as they were computed. Outside torchrun everything runs in the one process.

Work is a list of items (a prompt pair, a batch of rollouts, ...). Item i belongs to rank
i % world_size: the split depends on the item list and the number of ranks alone. Each item's
result depends on the item alone (its own seed, its own batch), never on its rank, so gathering
gives what one process computes, bit for bit (same dtype, device type and thread count).

`run_items` saves each finished item under `out_dir` before the next starts. A rank that dies
makes torchrun stop the job (its agent tears the others down) and the command fail; the items
already saved stay, and the same command again loads them instead of recomputing them.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Sequence as SequenceABC
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from hookedcot.errors import HookedCoTError

MANIFEST = "work.json"


class RankFailedError(HookedCoTError, RuntimeError):
    """Another rank died before the results were gathered (its saved work stays; rerun to resume)."""


class WorkFolderError(HookedCoTError, ValueError):
    """A resumed out_dir holds results of different work."""


@dataclass
class Ranks:
    """This process's place in the job. `group` is a gloo group for objects (None: one process)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n_items: int) -> list[int]:
        """The item indices this rank computes: i with i % world_size == rank."""
        return list(range(self.rank, n_items, self.world_size))

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.is_main else None
        try:
            dist.gather_object(obj, out, dst=0, group=self.group)
        except RuntimeError as exc:  # gloo: "Connection closed by peer" when a rank died
            raise RankFailedError(f"rank {self.rank}: another rank failed before the results were gathered ({exc}). "
                               "Work saved under out_dir stays; run the same command again to resume.") from exc
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank (what depends on one machine's state, e.g. free memory)."""
        if self.world_size == 1:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)


def init_ranks(backend: str | None = None, timeout_s: float = 1800) -> Ranks:
    """The job's ranks: joins (or starts) torch.distributed's default group when torchrun's
    environment says there are several processes, else a single-process `Ranks`. `backend`:
    None picks NCCL when CUDA is there, else gloo; objects always travel over gloo."""
    if not dist.is_available():
        return Ranks()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return Ranks()
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_device())
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world == 1:
        return Ranks()
    group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return Ranks(dist.get_rank(), world, group)


def local_device() -> torch.device:
    """This rank's GPU (cuda:LOCAL_RANK) when there are GPUs, else the CPU: where to load its model."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def fingerprint(obj: Any) -> str:
    """16 hex digits of sha256 over a JSON-able description of the work."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_manifest(out_dir: Path, description: dict[str, Any]) -> None:
    """Write `out_dir/work.json`, or check that a resumed folder was started for this same work."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(description, default=str)):
            diffs = [k for k in sorted(set(old) | set(description)) if old.get(k) != json.loads(json.dumps(description.get(k), default=str))]
            raise WorkFolderError(f"{out_dir} holds results of different work (differs in: {', '.join(diffs)}); "
                             "pass a new out_dir, or the same model, items and options to resume it")
        return
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(description, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)  # every rank writes the same bytes: whichever lands last is the same file


def run_items(
    compute: Callable[[int], Any],
    n_items: int,
    ranks: Ranks,
    out_dir: str | Path | None = None,
    description: dict[str, Any] | None = None,
    on_item: Callable[[int, Any], None] | None = None,
    in_memory: bool = True,
) -> Sequence[Any] | None:
    """`[compute(i) for i in range(n_items)]`, item i on rank i % world_size, gathered on rank 0
    (None on the other ranks). With `out_dir`, each result is saved as `item_{i:06d}.pt` as it
    finishes and loaded, not recomputed, by a later call; `description` (what the items are) is
    checked against the folder's so a resume never mixes two different runs.
    `in_memory=False` (needs `out_dir` on a filesystem every rank and rank 0 share): results stay
    on disk, only their indices are gathered, and rank 0 gets a sequence that loads item i when
    indexed — for results too big to hold all at once (activations)."""
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_manifest(out, description or {"n_items": n_items})
    elif not in_memory:
        raise ValueError("in_memory=False keeps results on disk: pass an out_dir (shared by every rank)")
    mine: dict[int, Any] = {}
    for i in ranks.share(n_items):
        path = out / f"item_{i:06d}.pt" if out is not None else None
        if path is not None and path.exists():
            mine[i] = torch.load(path, weights_only=False) if in_memory else True
            continue
        result = compute(i)
        if path is not None:
            tmp = path.with_suffix(".tmp")
            torch.save(result, tmp)
            os.replace(tmp, path)  # a rank killed mid-write leaves a .tmp, never a truncated item
        if on_item is not None:
            on_item(i, result)
        mine[i] = result if in_memory else True
    parts = ranks.gather(mine)
    if parts is None:
        return None
    merged = {i: r for part in parts for i, r in part.items()}
    missing = [i for i in range(n_items) if i not in merged]
    if missing:
        raise RuntimeError(f"rank 0 gathered no result for items {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    return [merged[i] for i in range(n_items)] if in_memory else SavedItems(out, n_items)


class SavedItems(SequenceABC):
    """Items saved by `run_items`, loaded one at a time when indexed."""

    def __init__(self, out_dir: Path, n_items: int):
        self.out_dir, self.n_items = out_dir, n_items

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        path = self.out_dir / f"item_{i:06d}.pt"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: its rank saved it where rank 0 cannot see (out_dir must be "
                                    "on a filesystem every node shares)")
        return torch.load(path, weights_only=False)


def saved_items(out_dir: str | Path) -> list[int]:
    """Indices of the items a folder already holds (what a resume will not recompute)."""
    return sorted(int(p.stem.split("_")[1]) for p in Path(out_dir).glob("item_*.pt"))
