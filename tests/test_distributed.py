"""Work over torch.distributed ranks: two local gloo processes (torch.multiprocessing.spawn) run a
patching sweep over prompt pairs and a rollout batch; rank 0's gathered results must equal, bit
for bit, what one process computes with the plain single-process calls. A rank that raises makes
the job fail with its finished items saved; the same job again resumes and computes only the rest.

Both sides run one CPU thread (torchrun's default per rank), fp32, the same tiny random model."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hookedcot import ModelConfig
from hookedcot.cot.rollouts import sample_rollouts as sample_rollouts_one
from hookedcot.dictionaries.store import collect_activations as collect_one
from hookedcot.distributed import Ranks, patch_pairs, saved_items
from hookedcot.distributed import collect_activations as collect_ranks
from hookedcot.distributed import sample_rollouts as sample_rollouts_ranks
from hookedcot.interp.sweeps import patch_layer_position
from model_factory import CharTokenizer, random_model

CFG = ModelConfig(n_layers=2, d_model=32, n_heads=4, n_key_value_heads=2, d_head=8, d_mlp=64, d_vocab=128,
                  tie_embeddings=False)
PAIRS = [("The cat sat on a mat", "The dog sat on a hat"), ("Two plus two is four", "Two plus two is five"),
         ("red green blue", "red green pink"), ("one two three", "one two tree!"), ("abcdefg", "abcxefg")]
PREFIX = [ord(c) for c in "Question: 3+4? Think:"]
N_ROLLOUTS, NEW = 6, 6
TEXTS = [torch.randint(1, 128, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 4, 12, 7, 7, 15, 5, 11)]
COLLECT = dict(hook_names=["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"], batch_size=3, shard_tokens=20)
SAMPLING = dict(temperature=0.8, top_p=0.95, max_new_tokens=NEW, stop_at_eos=False, seed=3)


def _model():
    return random_model(CFG, seed=0, tokenizer=CharTokenizer())


def _rows_budget(model, rows: int) -> int:
    """The smallest memory budget under which `rows_per_batch` gives `rows` (so rollouts split into items)."""
    from hookedcot.cot.rollouts import rows_per_batch

    lo, hi = 1, 1 << 40
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if rows_per_batch(model, NEW, memory_budget=mid) < rows else (lo, mid)
    return lo


def counting_sweep(model, clean, corrupted, calls_dir: str, **kw):
    """patch_layer_position, leaving a file per call (so a test can count what a rerun recomputed)
    and raising on the pair named by FAIL_ON (a rank dying mid-run; not an option of the work, so
    the rerun without it resumes the same work)."""
    if clean == os.environ.get("FAIL_ON"):
        raise RuntimeError(f"injected failure on {clean!r}")
    Path(calls_dir, f"{os.getpid()}_{clean.replace(' ', '_')}").touch()
    return patch_layer_position(model, clean, corrupted, **kw)


def _job(rank: int, world: int, port: int, tmp: str, fail_on: str | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FAIL_ON=fail_on or "")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        ranks = Ranks(rank, world, dist.group.WORLD)
        model = _model()
        sweeps = patch_pairs(model, PAIRS, counting_sweep, out_dir=Path(tmp, "sweep"), ranks=ranks,
                             calls_dir=str(Path(tmp, "calls")), batch_size=4)
        rollouts = sample_rollouts_ranks(model, PREFIX, N_ROLLOUTS, **SAMPLING, memory_budget=_rows_budget(model, 2),
                                         out_dir=Path(tmp, "rollouts"), ranks=ranks)
        store = collect_ranks(model, TEXTS, out=Path(tmp, "store"), ranks=ranks, **COLLECT)
        if rank == 0:
            torch.save({"sweeps": sweeps, "rollouts": rollouts}, Path(tmp, "gathered.pt"))
        else:
            assert sweeps is None and rollouts is None and store is None
    finally:
        dist.destroy_process_group()


def _spawn(tmp: Path, fail_on: str | None = None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    Path(tmp, "calls").mkdir(parents=True, exist_ok=True)
    mp.spawn(_job, args=(2, port, str(tmp), fail_on), nprocs=2, join=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process results, with the plain calls, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        sweeps = [patch_layer_position(model, c, x, progress=False, batch_size=4) for c, x in PAIRS]
        rollouts = sample_rollouts_one(model, PREFIX, N_ROLLOUTS, **SAMPLING, memory_budget=_rows_budget(model, 2),
                                       progress=False)
        store = tmp_path_factory.mktemp("single") / "store"
        collect_one(model, TEXTS, out=store, progress=False, **COLLECT)
    finally:
        torch.set_num_threads(threads)
    return {"sweeps": sweeps, "rollouts": rollouts, "store": store}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two_ranks")
    _spawn(tmp)
    return tmp, torch.load(tmp / "gathered.pt", weights_only=False)


def test_each_item_belongs_to_exactly_one_rank_whatever_the_number_of_ranks():
    for world in (1, 2, 3, 7):
        shares = [Ranks(r, world).share(10) for r in range(world)]
        assert sorted(i for s in shares for i in s) == list(range(10))
        assert shares == [list(range(r, 10, world)) for r in range(world)]


def test_the_sweep_over_two_ranks_equals_one_process_bit_for_bit(single, two_ranks):
    _, gathered = two_ranks
    assert len(gathered["sweeps"]) == len(PAIRS)
    for one, two in zip(single["sweeps"], gathered["sweeps"]):
        assert torch.equal(one.values, two.values)  # bitwise, not allclose
        assert (one.axes, one.labels, one.name, one.meta) == (two.axes, two.labels, two.name, two.meta)
    assert any(float(r.values.abs().max()) > 0 for r in single["sweeps"])  # the sweep measured something


def test_rollouts_over_two_ranks_equal_one_process_and_each_rank_wrote_its_share(single, two_ranks):
    tmp, gathered = two_ranks
    assert gathered["rollouts"] == single["rollouts"]
    assert [r.index for r in gathered["rollouts"]] == list(range(N_ROLLOUTS))
    assert len({tuple(r.tokens) for r in single["rollouts"]}) > 1  # sampled, not all the same continuation
    from hookedcot.cot.rollout_store import read_rollouts

    by_rank = {r: sorted(x.index for x in read_rollouts(tmp / "rollouts" / f"rank{r}" / "rollouts.jsonl")[1]) for r in (0, 1)}
    assert by_rank == {0: [0, 1, 4, 5], 1: [2, 3]}  # batches {0,1}, {2,3}, {4,5}: items 0 and 2 on rank 0


def test_a_rank_that_dies_fails_the_job_keeps_finished_work_and_a_rerun_resumes(single, tmp_path):
    # rank 1 owns pairs 1 and 3; it dies on pair 3 after finishing pair 1
    # whichever error the launcher sees first: rank 1's own, or rank 0's on losing its peer
    with pytest.raises(Exception, match="injected failure|another rank failed before the results were gathered"):
        _spawn(tmp_path, fail_on=PAIRS[3][0])
    saved = saved_items(tmp_path / "sweep")
    assert 1 in saved and 3 not in saved
    before = set(os.listdir(tmp_path / "calls"))
    _spawn(tmp_path)
    recomputed = {name.split("_", 1)[1] for name in set(os.listdir(tmp_path / "calls")) - before}
    assert recomputed == {PAIRS[i][0].replace(" ", "_") for i in range(len(PAIRS)) if i not in saved}
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=False)
    for one, two in zip(single["sweeps"], gathered["sweeps"]):
        assert torch.equal(one.values, two.values)
    assert gathered["rollouts"] == single["rollouts"]


def test_a_resume_refuses_a_folder_of_different_work(tmp_path):
    model = _model()
    patch_pairs(model, PAIRS[:1], out_dir=tmp_path, ranks=Ranks(), batch_size=4)
    with pytest.raises(ValueError, match="different work"):
        patch_pairs(model, PAIRS[1:2], out_dir=tmp_path, ranks=Ranks(), batch_size=4)


def test_a_rerun_with_one_rank_reads_every_ranks_rollouts_and_decodes_only_unfinished_batches(single, two_ranks,
                                                                                              tmp_path, monkeypatch):
    import shutil

    import hookedcot.distributed.rollouts as dr

    src, _ = two_ranks
    folder = tmp_path / "rollouts"
    shutil.copytree(src / "rollouts", folder)
    rank1 = folder / "rank1" / "rollouts.jsonl"
    lines = rank1.read_text().splitlines(keepends=True)  # header, rollout 2, rollout 3 (in finishing order)
    rank1.write_text("".join(lines[:2]) + lines[2][:10])  # one rollout lost, one half-written
    decoded = []
    real = dr.run_prefix

    def counting(model, prefix, jobs, *args, **kwargs):
        decoded.append([[i for i, _ in batch] for batch in kwargs["batches"]])
        return real(model, prefix, jobs, *args, **kwargs)

    monkeypatch.setattr(dr, "run_prefix", counting)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        again = sample_rollouts_ranks(model, PREFIX, N_ROLLOUTS, **SAMPLING, memory_budget=_rows_budget(model, 2),
                                      out_dir=folder, ranks=Ranks())
    finally:
        torch.set_num_threads(threads)
    assert decoded == [[[2, 3]]]  # one prefill, the batch with a rollout missing, decoded whole (its original shape)
    assert again == single["rollouts"]


def test_activations_collected_over_two_ranks_make_the_same_store_file_for_file(single, two_ranks):
    from safetensors.torch import load_file

    tmp, _ = two_ranks
    one, two = single["store"], tmp / "store"
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    assert json.loads((one / "store.json").read_text()) == json.loads((two / "store.json").read_text())
    shards = sorted(p.name for p in one.glob("*.safetensors"))
    assert len(shards) > 2  # several shards, several batches each: the buffering across ranks' batches is tested
    for name in shards:
        a, b = load_file(one / name), load_file(two / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp / "store.parts").exists()


def test_resample_steps_over_ranks_returns_what_the_single_process_call_returns(smol_model, tmp_path):
    """One rank here (the spread itself is the rollout engine tested above with two): the same
    ResamplingResult — rollouts, distributions, importances — as `cot.importance.resample_steps`."""
    from hookedcot.cot import CoT
    from hookedcot.cot.importance import resample_steps as resample_one
    from hookedcot.distributed import resample_steps as resample_ranks

    cot = CoT.from_text(smol_model, "Q: What is 12 times 7?\nA: <think>",
                        "Ten times 7 is 70. Two times 7 is 14.</think> The answer is 84.", correct_answer="84")
    kw = dict(temperature=0.7, max_new_tokens=4, seed=5, memory_budget=64 << 20)
    one = resample_one(smol_model, cot, 2, progress=False, **kw)
    ranks = resample_ranks(smol_model, cot, 2, out_dir=tmp_path, ranks=Ranks(), **kw)
    assert ranks.rollouts == one.rollouts and len(one.rollouts) == cot.n_steps + 1
    a, b = one.to_dict(), ranks.to_dict()
    assert a.keys() == b.keys()
    for key in a:
        if key != "rollouts_path":
            assert str(a[key]) == str(b[key]), key  # str: NaN == NaN
