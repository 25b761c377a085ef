"""The seeds' typical sweep: every layer × the last 16 positions of a 128-token prompt, batched
`patch_layer_position` against the naive one-hooked-forward-per-site loop (timed on a sample of
sites and extrapolated), on the embedded SmolLM2. Run: .venv/bin/python benchmarks/sweep_span.py"""

import time

import torch

from hookedcot import HookedCoT
from hookedcot.interp.patching import Site, kl_metric, prepare_runs
from hookedcot.interp.sweeps import naive_patch_loop, patch_layer_position


def main(n_pos: int = 128, span: int = 16, threads: int = 1) -> None:
    torch.set_num_threads(threads)
    model = HookedCoT.from_pretrained("smollm2-135m-instruct")
    clean = torch.randint(100, 20000, (1, n_pos), generator=torch.Generator().manual_seed(0))
    corrupted = clean.clone()
    corrupted[0, n_pos - span + 3] += 1
    t = time.perf_counter()
    result = patch_layer_position(model, clean, corrupted, positions=f"last {span}", progress=False)
    sweep_s = time.perf_counter() - t
    n = result.values.numel()
    layers = range(model.cfg.n_layers)
    runs = prepare_runs(model, clean, corrupted, [f"blocks.{L}.hook_resid_pre" for L in layers])
    sites = [Site(f"blocks.{L}.hook_resid_pre", (p,)) for L in layers for p in range(n_pos - span, n_pos)]
    sample = sites[::60]
    t = time.perf_counter()
    naive = naive_patch_loop(model, clean, corrupted, sample, kl_metric(runs))
    per_site = (time.perf_counter() - t) / len(sample)
    diff = float((naive - result.values.flatten()[::60]).abs().max())
    print(f"{n} sites: batched sweep {sweep_s:.1f} s ({n / sweep_s:.1f} patched forwards/s); naive loop "
          f"{per_site:.3f} s/site ({1 / per_site:.2f}/s); speedup {per_site * n / sweep_s:.1f}x; "
          f"max |diff| on {len(sample)} sampled sites {diff:.1e}; torch threads {threads}")


if __name__ == "__main__":
    main()
