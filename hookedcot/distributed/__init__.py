"""Work spread over the ranks of a `torchrun` job (torch.distributed; no cluster layer of our own).

- `init_ranks()`, `local_device()`: this process's rank and the device to load its model on;
- `patch_pairs(model, pairs, sweep, out_dir=)`: a patching sweep per prompt pair;
- `sample_rollouts(...)`, `resample_steps(...)`: rollouts of a prefix / of every prefix of a CoT;
- `collect_activations(...)`: an activation store's batches.

Each returns on rank 0 what the single-process call returns (None on the other ranks), and with
`out_dir` a rerun after a failure resumes. Launch: `torchrun --nproc-per-node N script.py`, on
SLURM `srun torchrun --nnodes $SLURM_NNODES --nproc-per-node N --rdzv-backend c10d
--rdzv-endpoint $HEAD:29500 script.py` (README).
"""

from hookedcot.distributed.activations import collect_activations
from hookedcot.distributed.ranks import (
    RankFailedError, Ranks, WorkFolderError, init_ranks, local_device, run_items, saved_items,
)
from hookedcot.distributed.rollouts import resample_steps, sample_rollouts
from hookedcot.distributed.sweeps import patch_pairs

__all__ = ["RankFailedError", "Ranks", "WorkFolderError", "collect_activations", "init_ranks", "local_device", "patch_pairs", "resample_steps", "run_items", "sample_rollouts",
           "saved_items"]
