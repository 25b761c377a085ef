"""A chain of thought as an object: prompt, reasoning, answer, and the map between tokens and steps.

A `CoT` holds the token ids of the whole sequence (prompt, then the completion) and the decoded
text with each token's character span. The reasoning is the text between the think delimiters
(R1-style `<think>` … `</think>` by default; `think=None`: the whole completion), cut into steps
by `split_steps`' rules. Every step knows its characters and its tokens: a token belongs to the
step holding its first non-space character inside the reasoning (so " First", whose space ends
the previous sentence, goes with "First", and a token that straddles a split goes to the step
where its text starts), and the steps' token spans tile the reasoning's tokens. Tokens are the
ground truth: everything downstream (rollouts, forced answers, attention) runs on `cot.tokens`,
never on re-tokenized text.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from hookedcot.cot.answers import answers_match, extract_answer
from hookedcot.cot.steps import StepRule, step_spans

THINK = ("<think>", "</think>")
FORMAT = "hookedcot.cot/1"


@dataclass(frozen=True)
class Step:
    index: int
    text: str  # stripped, for reading
    chars: tuple[int, int]  # [start, end) in `CoT.text`, whitespace after the step included
    tokens: tuple[int, int]  # [start, end) positions in `CoT.tokens`; empty when start == end
    kind: str = "text"  # "text" or "latent" (a continuous-thought position)

    @property
    def positions(self) -> list[int]:
        return list(range(*self.tokens))


class CoT:
    """One reasoning trace. Build it with `CoT.generate`, `CoT.from_text` or `CoT.from_tokens`."""

    def __init__(
        self,
        tokens: Sequence[int],
        text: str,
        token_chars: Sequence[tuple[int, int]],
        prompt_len: int,
        reasoning_chars: tuple[int, int],
        answer_chars: tuple[int, int],
        steps: Sequence[Step],
        think: tuple[str, str] | None = THINK,
        correct_answer: str | None = None,
        meta: dict[str, Any] | None = None,
    ):
        self.tokens = [int(t) for t in tokens]
        self.text = text
        self.token_chars = [(int(a), int(b)) for a, b in token_chars]
        self.prompt_len = int(prompt_len)
        self.reasoning_chars = (int(reasoning_chars[0]), int(reasoning_chars[1]))
        self.answer_chars = (int(answer_chars[0]), int(answer_chars[1]))
        self.steps = list(steps)
        self.think = tuple(think) if think is not None else None
        self.correct_answer = None if correct_answer is None else str(correct_answer)
        self.meta = dict(meta or {})
        self.embeds = None  # [1, pos, d_model] for traces with latent positions (CoT.from_latent)
        if len(self.token_chars) != len(self.tokens):
            raise ValueError(f"{len(self.tokens)} tokens but {len(self.token_chars)} character spans")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_tokens(
        cls,
        tokenizer: Any,
        tokens: Sequence[int],
        prompt_len: int,
        *,
        think: tuple[str, str] | None = THINK,
        steps: StepRule = "sentences",
        correct_answer: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> "CoT":
        """A trace from token ids: the first `prompt_len` are the prompt, the rest the completion.
        `tokenizer` is a model (its tokenizer is used) or a hookedcot tokenizer."""
        tok = getattr(tokenizer, "tokenizer", tokenizer)
        if tok is None or not hasattr(tok, "char_spans"):
            raise ValueError("building a CoT needs the model's tokenizer (a HookedCoT loaded with one, or its Tokenizer)")
        tokens = [int(t) for t in (tokens.reshape(-1).tolist() if hasattr(tokens, "reshape") else tokens)]
        if not 0 <= prompt_len <= len(tokens):
            raise ValueError(f"prompt_len {prompt_len} is outside the {len(tokens)} tokens")
        text, chars = tok.char_spans(tokens)
        specials = set(getattr(tok, "eos_token_ids", []) or [])
        pad = getattr(tok, "pad_token_id", None)
        if pad is not None:
            specials.add(pad)
        prompt_end = chars[prompt_len - 1][1] if prompt_len else 0
        content_end = prompt_end
        for t, (_, hi) in zip(tokens[prompt_len:], chars[prompt_len:]):
            if t not in specials:
                content_end = max(content_end, hi)
        r0, r1, a0, a1 = _locate(text, prompt_end, content_end, think)
        if think is not None and not any(tag and tag in text[max(0, prompt_end - 64):] for tag in think):
            think = None  # neither delimiter in the trace: answer-forcing and rollouts should not close a block
        spans = [(r0 + a, r0 + b) for a, b in step_spans(text[r0:r1], steps)]
        step_list = _steps_with_tokens(text, chars, spans, (r0, r1))
        rule = steps if isinstance(steps, str) else type(steps).__name__
        meta = {"step_rule": rule, **(meta or {})}
        return cls(tokens, text, chars, prompt_len, (r0, r1), (a0, a1), step_list, think, correct_answer, meta)

    @classmethod
    def from_text(
        cls,
        model: Any,
        prompt: str,
        completion: str,
        *,
        chat: bool = False,
        think: tuple[str, str] | None = THINK,
        steps: StepRule = "sentences",
        correct_answer: str | None = None,
        meta: dict[str, Any] | None = None,
    ) -> "CoT":
        """A trace produced elsewhere: the prompt (through the chat template when `chat`) and the
        completion (reasoning, then optionally the closing delimiter and the answer), tokenized the
        way generation would have produced them (prompt with the tokenizer's specials, completion
        without)."""
        tok = model._require_tokenizer() if hasattr(model, "_require_tokenizer") else model
        prompt_text = _chat_prompt(model, prompt) if chat else prompt
        prompt_ids = tok.tokenize(prompt_text)[0][0].tolist()
        completion_ids = tok.encode(completion, add_special_tokens=False)
        return cls.from_tokens(tok, prompt_ids + completion_ids, len(prompt_ids), think=think, steps=steps,
                               correct_answer=correct_answer, meta=meta)

    @classmethod
    def generate(
        cls,
        model: Any,
        prompt: str,
        *,
        chat: bool = True,
        think: tuple[str, str] | None = THINK,
        steps: StepRule = "sentences",
        max_new_tokens: int = 1024,
        correct_answer: str | None = None,
        **generate_kwargs: Any,
    ) -> "CoT":
        """Generate a trace from a question (greedy unless `do_sample=True`; every option of
        `model.generate` passes through). With `chat`, the question goes through the model's chat
        template as one user message; R1 templates end the prompt with `<think>`."""
        prompt_text = _chat_prompt(model, prompt) if chat else prompt
        prompt_ids = model.to_tokens(prompt_text)
        out = model.generate(prompt_ids, max_new_tokens, return_type="tokens", **generate_kwargs)
        meta = {"question": prompt, "chat": chat, "max_new_tokens": max_new_tokens,
                **{k: v for k, v in generate_kwargs.items() if isinstance(v, (int, float, str, bool, type(None)))}}
        return cls.from_tokens(model, out[0].tolist(), prompt_ids.shape[1], think=think, steps=steps,
                               correct_answer=correct_answer, meta=meta)

    @classmethod
    def from_latent(cls, trace: Any, *, correct_answer: str | None = None, meta: dict[str, Any] | None = None) -> "CoT":
        """A continuous-thought trace (`hookedcot.cot.latent.generate_latent`) as a CoT: one step
        per latent position (kind "latent", text "<latent:i>"), the input embeddings in `cot.embeds`
        so the anatomy tools run on them; what follows the latent block is the answer text."""
        text, chars = trace.char_spans()
        spans = trace.step_spans()
        steps = [Step(i, label, (chars[a][0], chars[b - 1][1]), (a, b), kind="latent")
                 for i, ((a, b), label) in enumerate(zip(spans, trace.steps_text()))]
        r0 = steps[0].chars[0] if steps else len(text)
        r1 = steps[-1].chars[1] if steps else len(text)
        cot = cls(trace.tokens, text, chars, trace.prompt_len, (r0, r1), (r1, len(text)), steps, None, correct_answer,
                  {"step_rule": "latent", **(meta or {})})
        cot.embeds = trace.embeds.detach()
        return cot

    def resplit(self, steps: StepRule) -> "CoT":
        """The same tokens cut into steps by another rule."""
        tok_meta = dict(self.meta, step_rule=steps if isinstance(steps, str) else type(steps).__name__)
        if self.embeds is not None:
            raise ValueError("a trace with latent positions has one step per latent position; it cannot be re-split")
        r0, r1 = self.reasoning_chars
        spans = [(r0 + a, r0 + b) for a, b in step_spans(self.text[r0:r1], steps)]
        return CoT(self.tokens, self.text, self.token_chars, self.prompt_len, self.reasoning_chars, self.answer_chars,
                   _steps_with_tokens(self.text, self.token_chars, spans, self.reasoning_chars), self.think,
                   self.correct_answer, tok_meta)

    # ------------------------------------------------------------------ reading
    @property
    def prompt(self) -> str:
        return self.text[: self.token_chars[self.prompt_len - 1][1]] if self.prompt_len else ""

    @property
    def reasoning(self) -> str:
        return self.text[slice(*self.reasoning_chars)]

    @property
    def answer_text(self) -> str:
        """What follows the reasoning (after the closing delimiter); empty when there is none."""
        return self.text[slice(*self.answer_chars)]

    @property
    def answer(self) -> str | None:
        """The extracted final answer: from the text after the reasoning, else from the reasoning."""
        if self.embeds is not None:  # latent steps are labels, not text to read an answer from
            return extract_answer(self.answer_text)
        return extract_answer(self.answer_text) or extract_answer(self.reasoning)

    @property
    def is_correct(self) -> bool | None:
        return None if self.correct_answer is None else answers_match(self.answer, self.correct_answer)

    @property
    def n_steps(self) -> int:
        return len(self.steps)

    @property
    def step_texts(self) -> list[str]:
        return [s.text for s in self.steps]

    @property
    def reasoning_tokens(self) -> tuple[int, int]:
        """[start, end) token positions the steps tile."""
        if not self.steps:
            return (self.prompt_len, self.prompt_len)
        return (self.steps[0].tokens[0], self.steps[-1].tokens[1])

    def prefix(self, n_steps: int) -> list[int]:
        """Token ids before step `n_steps`: the prompt and the reasoning up to it (`prefix(0)` ends
        where the first step starts; `prefix(n_steps)` where the last one ends)."""
        if not 0 <= n_steps <= len(self.steps):
            raise ValueError(f"prefix takes 0..{len(self.steps)} steps, got {n_steps}")
        end = self.steps[n_steps].tokens[0] if n_steps < len(self.steps) else self.reasoning_tokens[1]
        return self.tokens[:end]

    def step_of(self, position: int) -> int | None:
        """The step holding token `position`, or None (prompt, delimiters, answer)."""
        for step in self.steps:
            if step.tokens[0] <= position < step.tokens[1]:
                return step.index
        return None

    def __repr__(self) -> str:
        return (f"CoT({len(self.tokens)} tokens, prompt {self.prompt_len}, {self.n_steps} steps, "
                f"answer {self.answer!r}" + (f", correct {self.correct_answer!r}" if self.correct_answer else "") + ")")

    # ------------------------------------------------------------------ saving
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "tokens": self.tokens, "text": self.text, "token_chars": self.token_chars,
            "prompt_len": self.prompt_len, "reasoning_chars": self.reasoning_chars, "answer_chars": self.answer_chars,
            "steps": [asdict(s) for s in self.steps], "think": self.think, "correct_answer": self.correct_answer,
            "meta": self.meta, "embeds": None if self.embeds is None else self.embeds.float().tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CoT":
        if data.get("format") != FORMAT:
            raise ValueError(f"not a saved CoT (format {data.get('format')!r}; expected {FORMAT!r})")
        steps = [Step(s["index"], s["text"], tuple(s["chars"]), tuple(s["tokens"]), s.get("kind", "text"))
                 for s in data["steps"]]
        cot = cls(data["tokens"], data["text"], [tuple(c) for c in data["token_chars"]], data["prompt_len"],
                  tuple(data["reasoning_chars"]), tuple(data["answer_chars"]), steps,
                  tuple(data["think"]) if data.get("think") else None, data.get("correct_answer"), data.get("meta"))
        if data.get("embeds") is not None:
            import torch

            cot.embeds = torch.tensor(data["embeds"])
        return cot

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), ensure_ascii=False))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CoT":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _chat_prompt(model: Any, question: str) -> str:
    return model.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)


def _locate(text: str, prompt_end: int, content_end: int, think: tuple[str, str] | None) -> tuple[int, int, int, int]:
    """(reasoning start, reasoning end, answer start, answer end) in characters. The reasoning
    starts after the opening delimiter (in the completion, else the last one in the prompt: R1
    templates end the prompt with it) or, without one, where the completion starts; it ends at the
    closing delimiter, else where the completion's content ends. Whitespace at either end is left
    out so the first and last steps start and end on text."""
    r0, r1, a0, a1 = prompt_end, content_end, content_end, content_end
    if think is not None:
        open_tag, close_tag = think
        at = text.find(open_tag, prompt_end, content_end) if open_tag else -1
        if at < 0 and open_tag:
            at = text.rfind(open_tag, 0, prompt_end)
            at = at if at >= 0 and not text[at + len(open_tag) : prompt_end].strip() else -1
        if at >= 0:
            r0 = max(prompt_end, at + len(open_tag))
        close = text.find(close_tag, r0, content_end) if close_tag else -1
        if close >= 0:
            r1, a0 = close, close + len(close_tag)
    while r0 < r1 and text[r0].isspace():
        r0 += 1
    while r1 > r0 and text[r1 - 1].isspace():
        r1 -= 1
    while a0 < a1 and text[a0].isspace():
        a0 += 1
    return r0, r1, a0, a1


def _steps_with_tokens(text: str, chars: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]],
                       reasoning: tuple[int, int]) -> list[Step]:
    """Steps with their token spans: each token goes to the step holding its first non-space
    character inside the reasoning (a whitespace-only token: its first character), so BPE's
    leading-space tokens go with the word they start; a step no token starts in is empty."""
    r0, r1 = reasoning
    owner: list[tuple[int, int]] = []  # (token position, step index)
    k = 0
    for pos, (lo, hi) in enumerate(chars):
        first = max(lo, r0)
        if hi <= r0 or first >= r1 or (hi == lo and not r0 <= lo < r1):
            continue
        body = len(text[first:min(hi, r1)]) - len(text[first:min(hi, r1)].lstrip())
        if first + body < min(hi, r1):
            first += body  # " First": the leading space is the previous step's, the word this one's
        while k < len(spans) and first >= spans[k][1]:
            k += 1
        if k == len(spans):
            break
        if first >= spans[k][0]:
            owner.append((pos, k))
    steps, next_start = [], owner[0][0] if owner else 0
    for index, (a, b) in enumerate(spans):
        mine = [pos for pos, s in owner if s == index]
        start = mine[0] if mine else next_start
        end = mine[-1] + 1 if mine else start
        steps.append(Step(index, text[a:b].strip(), (a, b), (start, end)))
        next_start = end
    return steps
