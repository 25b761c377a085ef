"""Parity figures per quirk of the test matrix: max |Δlogit| / max |logit| against transformers
(fp32 eager and sdpa, single and left-padded; bf16 sdpa and its top-1 agreement).
Run: .venv/bin/python benchmarks/parity.py  (prints a markdown table)."""
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import QUIRKS, build_tiny_checkpoint
from transformers import AutoModelForCausalLM
from hookedcot import HookedCoT
from test_parity import prompts
root = Path(tempfile.mkdtemp())
print("| quirk | fp32 vs HF eager (single) | fp32 vs HF eager (padded batch) | fp32 vs HF sdpa (single) | HF's own sdpa vs eager | bf16 vs HF bf16 sdpa | bf16 top-1 agreement |")
print("|---|---|---|---|---|---|---|")
with torch.no_grad():
    for q in QUIRKS:
        path = build_tiny_checkpoint(q, root / q)
        ours = HookedCoT.from_pretrained(path)
        ours16 = HookedCoT.from_pretrained(path, dtype="bfloat16")
        hf = {a: AutoModelForCausalLM.from_pretrained(path, attn_implementation=a, dtype=torch.float32).eval() for a in ("eager", "sdpa")}
        hf16 = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.bfloat16).eval()
        tokens, mask = prompts(ours.cfg.d_vocab)
        rel = lambda a, b: float((a.float() - b.float()).abs().max() / b.float().abs().max())
        single = tokens[:1]
        e = hf["eager"](single).logits; s = hf["sdpa"](single).logits
        pos = (mask.cumsum(-1) - 1).clamp(min=0); real = mask.bool()
        pe = hf["eager"](tokens, attention_mask=mask, position_ids=pos).logits
        o16, h16 = ours16(tokens), hf16(tokens).logits
        print(f"| {q} | {rel(ours(single), e):.1e} | {rel(ours(tokens, attention_mask=mask)[real], pe[real]):.1e} | {rel(ours(single), s):.1e} | {rel(s, e):.1e} | {rel(o16, h16):.1e} | {float((o16.argmax(-1) == h16.argmax(-1)).float().mean()):.3f} |")
