"""The fuzzed loaders under real resource limits: a child process with its address space capped at
1 GiB above what it has mapped after imports runs the attacker cases of issue 16 and 200 seeded
GGUF, safetensors and config mutations each; an allocation sized from a corrupt count would hit
the cap and escape as MemoryError (the test fails), a loop over one would hit the time limit.
The child reports its peak resident memory, which must stay within 64 MiB of where it started.
(tracemalloc in the fuzz tests sees Python and numpy allocations only; this sees everything.)"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CHILD = textwrap.dedent(
    """
    import json, random, resource, sys
    from pathlib import Path

    sys.path.insert(0, {tests!r})
    import gguf, torch
    import test_fuzz_gguf as G, test_fuzz_safetensors as S, test_fuzz_config as C
    from fuzzing import Tally

    def rss_mib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    root = Path({root!r})
    (root / "g").mkdir(); (root / "s").mkdir(); (root / "c").mkdir()
    originals = [G._original(root / "g", "llama", gguf.GGMLQuantizationType.F32),
                 G._original(root / "g", "qwen2", gguf.GGMLQuantizationType.Q8_0)]
    st = S.Original(root / "s")
    import safetensors.torch as sf
    sf.save_file(S.tiny_hf_tensors(), root / "c" / "model.safetensors", metadata={{"format": "pt"}})
    (root / "c" / "config.json").write_text(json.dumps(S.TINY_HF_CONFIG))
    from fuzzing import one_thread
    with torch.no_grad(), one_thread():
        config_logits = G.HookedCoT.from_pretrained(str(root / "c"))(C.PROBE)
    vm = int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize:"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.RLIM_INFINITY))
    start = rss_mib()
    (root / "g" / "cases").mkdir(); (root / "s" / "cases").mkdir()
    from fuzzing import run_case
    attack = Tally("attacker cases")
    for orig in originals:
        for name, data in G.attacker_files(orig).items():
            (root / "g" / "attack.gguf").write_bytes(data)
            run_case(attack, name, lambda: G.HookedCoT.from_pretrained(str(root / "g" / "attack.gguf")), None)
    for key, value in C.ATTACKER_VALUES:
        (root / "c" / "config.json").write_text(json.dumps({{**S.TINY_HF_CONFIG, key: value}}))
        run_case(attack, f"{{key}}={{value!r:.20}}", lambda: G.HookedCoT.from_pretrained(str(root / "c")), None)
    (root / "c" / "config.json").write_text(json.dumps(S.TINY_HF_CONFIG))
    tallies = [attack, G.fuzz(originals, {n}, 7, root / "g" / "cases"), S.fuzz(st, {n}, 7, root / "s" / "cases"),
               C.fuzz((root / "c", config_logits), {n}, 7)]
    out = {{"attack_loaded": attack.outcomes["loaded"], "start_mib": start, "peak_mib": rss_mib(), "escaped": [e for t in tallies for e in t.escaped],
           "summaries": [t.summary() for t in tallies]}}
    print("RESULT " + json.dumps(out))
    """
)


def test_fuzzed_loaders_stay_within_a_memory_cap(tmp_path):
    code = CHILD.format(tests=str(TESTS), root=str(tmp_path), n=200)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=TESTS.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    print("\n" + "\n".join(result["summaries"]), f"\npeak RSS {result['start_mib']:.0f} -> {result['peak_mib']:.0f} MiB")
    assert not result["escaped"], result["escaped"][:10]
    assert result["attack_loaded"] == 0
    assert result["peak_mib"] - result["start_mib"] < 64
