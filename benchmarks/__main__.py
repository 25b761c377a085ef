"""`python -m benchmarks [--quick] [--only forward,generate,...] [--models ...] [--peers ...]
[--device cuda] [--dtype bfloat16] [--threads N] [--out DIR]`

Runs the questions in order and writes, after each one (so a long run keeps what it has):
`results.json` (machine, versions, every raw timing: median/min/max over repetitions, warm-up
excluded) and `results.md` (one table per question, then the budgets met or missed).
"""

from __future__ import annotations

import argparse
import importlib
import os
import time
import traceback
from pathlib import Path

import torch

from benchmarks.common import ALL_PEERS, CACHE_DIR, DEFAULT_MODELS, Settings, fmt, machine_info, markdown_table, write_json
from benchmarks.processes import close_all

BENCHMARKS = ("forward", "generate", "patching_sweep", "loading", "roofline", "rollouts", "attention_anatomy", "activation_store",
              "steered_generate", "graph_cache")


def parse(argv: list[str] | None) -> Settings:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a minutes-long pass: smallest shapes, fewest repetitions")
    p.add_argument("--tiny", action="store_true", help="the smoke test's size: checks the plumbing, times nothing useful")
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--models", default=None,
                   help="comma-separated: smollm2-135m-instruct, qwen2-0.5b-shape, llama3.2-1b-shape, or checkpoint folders "
                        "(default: all three, less the ones a benchmark skips for time on CPU)")
    p.add_argument("--peers", default=",".join(ALL_PEERS),
                   help=f"comma-separated subset of {','.join(ALL_PEERS)}, or 'none' (hookedcot alone)")
    p.add_argument("--peers-everywhere", action="store_true",
                   help="run every peer on every model (default: peers beyond HF sdpa on SmolLM2 only, for time)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads for every tool (default: every core)")
    p.add_argument("--out", default="bench_out", help="output folder (results.md, results.json)")
    p.add_argument("--cache-dir", default=str(CACHE_DIR), help="where the benchmark checkpoints are built and kept")
    args = p.parse_args(argv)
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    peers = () if args.peers.strip() in ("", "none") else tuple(x.strip() for x in args.peers.split(",") if x.strip())
    bad = sorted(set(peers) - set(ALL_PEERS))
    if bad:
        p.error(f"unknown peer(s) {bad}; choose from {', '.join(ALL_PEERS)} or 'none'")
    settings = Settings(
        size="tiny" if args.tiny else "quick" if args.quick else "full", device=args.device,
        dtype=getattr(torch, args.dtype), out_dir=Path(args.out),
        models=[m.strip() for m in (args.models or ",".join(DEFAULT_MODELS)).split(",") if m.strip()], peers=peers,
        models_explicit=args.models is not None, peers_everywhere=args.peers_everywhere,
        threads=args.threads, cache_dir=Path(args.cache_dir).expanduser(),
    )
    settings.only = only  # type: ignore[attr-defined]
    return settings


def render(info: dict, results: list[dict]) -> str:
    v = info["versions"]
    lines = [
        "# hookedcot benchmarks\n",
        f"- date: {info['date']}; size: {info['size']}; device: {info['device']}"
        + (f" ({info['gpu']})" if "gpu" in info else "") + f"; dtype: {info['dtype']}",
        f"- machine: {info['cpu']}, {info['cores']} cores, torch threads {info['threads']}, "
        f"load average at start {', '.join(f'{x:.1f}' for x in info['load_average_at_start'])}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "- every ratio is measured in this run, against the reference on the same weights and inputs, "
        "repetitions interleaved; times are medians (min / max / n in results.json)\n",
    ]
    budget_rows = []
    for res in results:
        mod = importlib.import_module(f"benchmarks.{res['benchmark']}")
        lines.append(f"## {res['benchmark']}\n")
        if res.get("error"):
            lines.append(f"**failed**: `{res['error']}`\n")
            continue
        lines.append(markdown_table(mod.TABLE_COLUMNS, res["rows"]))
        for s in res["skipped"]:
            where = " / ".join(str(s[k]) for k in ("model", "tool", "case") if k in s)
            lines.append(f"- skipped {where}: {s['reason']}")
        for note in res["notes"]:
            lines.append(f"- {note}")
        lines.append("")
        budget_rows += res["budgets"]
    if budget_rows:
        lines.append("## budgets (design §5)\n")
        lines.append(markdown_table(["budget", "model", "shape", "ratio", "limit", "verdict"], budget_rows))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> list[dict]:
    settings = parse(argv)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    info = machine_info(settings)
    print(f"benchmarks ({settings.size}) on {info['cpu']}, {info['threads']} threads, torch {info['torch']} -> {settings.out_dir}")
    results: list[dict] = []
    for name in settings.only:  # type: ignore[attr-defined]
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            res = importlib.import_module(f"benchmarks.{name}").run(settings)
        except Exception as err:  # one question failing must not lose the others
            traceback.print_exc()
            res = {"benchmark": name, "rows": [], "skipped": [], "notes": [], "budgets": [],
                   "error": f"{type(err).__name__}: {err}"}
        finally:
            close_all()
        res["wall_s"] = time.perf_counter() - t0
        results.append(res)
        for b in res["budgets"]:
            print(f"   {b['verdict']:>6}  {b['budget']}  [{b['model']} {b['shape']}]  ratio {fmt(b['ratio'])}")
        print(f"   ({res['wall_s']:.0f} s)", flush=True)
        info["load_average_at_end"] = os.getloadavg()
        write_json(settings.out_dir / "results.json", {"machine": info, "results": results})
        (settings.out_dir / "results.md").write_text(render(info, results))
    return results


if __name__ == "__main__":
    main()
