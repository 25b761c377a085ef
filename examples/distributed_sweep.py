"""A patching sweep over many prompt pairs and a batch of rollouts, spread over torchrun's ranks.

    torchrun --nproc-per-node 2 examples/distributed_sweep.py --n-pairs 16 --rollouts 32
    srun torchrun --nnodes $SLURM_NNODES --nproc-per-node 4 --rdzv-backend c10d \\
        --rdzv-endpoint $(scontrol show hostnames $SLURM_JOB_NODELIST | head -n1):29500 \\
        examples/distributed_sweep.py --model ./DeepSeek-R1-Distill-Qwen-14B --dtype bfloat16 --n-pairs 1000

Each rank loads the model (on its own GPU, `local_device()`, or with `--device-map auto` over
every GPU it sees: then start one rank per node, or give each rank its GPUs with
CUDA_VISIBLE_DEVICES), takes pairs i ≡ rank (mod world size), and saves each result under
--out as it finishes; rank 0 gathers them, writes one JSON per pair and `timing.json`. Run the
same command again after a failure: finished pairs and rollouts are loaded, not recomputed.
Without torchrun it runs in one process.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="HF folder, hub id, .gguf or embedded model name")
    p.add_argument("--dtype", default=None)
    p.add_argument("--device-map", default=None, help="'auto' to split the model over this rank's GPUs")
    p.add_argument("--n-pairs", type=int, default=8, help="generated arithmetic clean/corrupted pairs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hook", default="resid_pre")
    p.add_argument("--positions", default="last 8", help="positions patched (a positions spec)")
    p.add_argument("--batch-size", type=int, default=64, help="patched rows per batch (an int keeps runs comparable)")
    p.add_argument("--rollouts", type=int, default=0, help="rollouts of one prompt (0: none)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--memory-budget", type=int, default=64 << 20, help="bytes per rollout batch (cuts the work items)")
    p.add_argument("--out", default="hookedcot_out/distributed_sweep")
    args = p.parse_args(argv)

    from hookedcot import HookedCoT
    from hookedcot.distributed import init_ranks, local_device, patch_pairs, sample_rollouts
    from hookedcot.interp.data import format_prompt, generate_pairs, keep_same_length_pairs
    from hookedcot.interp.sweeps import patch_layer_position

    ranks = init_ranks()
    t0 = time.perf_counter()
    placement = {"device_map": args.device_map} if args.device_map else {"device": local_device()}
    model = HookedCoT.from_pretrained(args.model, dtype=args.dtype, **placement)
    load_s = time.perf_counter() - t0
    problems = keep_same_length_pairs(model, generate_pairs(4 * args.n_pairs, seed=args.seed))[: args.n_pairs]
    pairs = [(format_prompt(x.clean, "qa", model), format_prompt(x.corrupted, "qa", model)) for x in problems]
    out = Path(args.out)

    t1 = time.perf_counter()
    results = patch_pairs(model, pairs, patch_layer_position, out_dir=out / "sweep", ranks=ranks, hook=args.hook,
                          positions=args.positions, batch_size=args.batch_size)
    sweep_s = time.perf_counter() - t1
    rollouts, rollout_s = None, 0.0
    if args.rollouts:
        prefix = model.to_tokens(format_prompt(problems[0].clean, "qa", model))[0].tolist()
        t2 = time.perf_counter()
        rollouts = sample_rollouts(model, prefix, args.rollouts, max_new_tokens=args.max_new_tokens, stop_at_eos=False,
                                   seed=args.seed, memory_budget=args.memory_budget, out_dir=out / "rollouts", ranks=ranks)
        rollout_s = time.perf_counter() - t2
    if not ranks.is_main:
        return None
    for i, result in enumerate(results):
        result.save(out / "results", f"pair{i:04d}.json")
    timing = {"world_size": ranks.world_size, "threads_per_rank": torch.get_num_threads(), "load_s": load_s,
              "pairs": len(pairs), "sweep_s": sweep_s, "pairs_per_s": len(pairs) / sweep_s,
              "rollouts": args.rollouts, "rollout_s": rollout_s,
              "rollouts_per_s": args.rollouts / rollout_s if rollout_s else None,
              "max_new_tokens": args.max_new_tokens}
    (out / "timing.json").write_text(json.dumps(timing, indent=1))
    print(json.dumps(timing), flush=True)
    return timing


if __name__ == "__main__":
    main()
