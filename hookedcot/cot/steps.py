"""Splitting a chain of thought into steps: character spans that tile the reasoning exactly.

Sentences by default, with Thought Anchors' rules (Bogdan et al. 2025): a boundary after `.`,
`?` or `!` followed by whitespace (so `2.5` is not one) and at a blank line; pieces shorter than
10 characters (stripped) merge into the next one, the last into the previous. Unlike the Thought
Anchors repository's `split_solution_into_chunks`, the trailing piece is kept even without final
punctuation. The whitespace after a boundary stays with the step before it, so the spans tile the
text with nothing left over; `split_steps` returns the stripped texts.

Other rules: `"lines"` (one step per non-blank line), a compiled regex or a pattern string
prefixed `"re:"` (a step ends where a match ends), a callable (text -> list of step strings in
order, or list of (start, end) spans), or explicit (start, end) spans.
"""

from __future__ import annotations

import re
from typing import Callable, Sequence, Union

Span = tuple[int, int]
StepRule = Union[str, "re.Pattern[str]", Callable[[str], Sequence], Sequence[Span]]

MIN_STEP_CHARS = 10
RULES = ("sentences", "lines", "re:<pattern>", "a compiled regex", "a callable", "a list of (start, end) spans")


def split_steps(text: str, by: StepRule = "sentences", min_chars: int = MIN_STEP_CHARS) -> list[str]:
    """The steps of `text` as stripped strings (see the module docstring for the rules)."""
    return [text[a:b].strip() for a, b in step_spans(text, by, min_chars)]


def step_spans(text: str, by: StepRule = "sentences", min_chars: int = MIN_STEP_CHARS) -> list[Span]:
    """[start, end) character spans that tile `text` (whitespace-only text has no steps)."""
    if not text.strip():
        return []
    if isinstance(by, str) and by == "sentences":
        return _merge_short(_tile(text, _sentence_ends(text)), text, min_chars)
    if isinstance(by, str) and by == "lines":
        return _tile(text, [m.end() for m in re.finditer(r"\n", text)])
    if isinstance(by, str) and by.startswith("re:"):
        by = re.compile(by[3:])
    if isinstance(by, re.Pattern):
        return _tile(text, [m.end() for m in by.finditer(text) if m.end() > m.start()])
    if isinstance(by, str):
        raise ValueError(f"unknown step rule {by!r}; use one of: {', '.join(RULES)}")
    if callable(by):
        return _spans_from(text, list(by(text)))
    return _check_spans(text, [tuple(s) for s in by])


def _sentence_ends(text: str) -> list[int]:
    """Offsets just after each boundary: a sentence mark followed by whitespace, or a blank line."""
    ends = [m.start() + 1 for m in re.finditer(r"[.?!](?=\s)", text)]
    ends += [m.start() + 1 for m in re.finditer(r"\n(?=[ \t\r]*\n)", text)]
    return sorted(set(ends))


def _tile(text: str, ends: Sequence[int]) -> list[Span]:
    """Cut at `ends`, move each cut past the whitespace that follows it, drop blank pieces into
    the step before them (or the one after, at the start)."""
    cuts, n = [], len(text)
    for end in ends:
        while end < n and text[end].isspace():
            end += 1
        if 0 < end < n and (not cuts or end > cuts[-1]):
            cuts.append(end)
    bounds = [0, *cuts, n]
    spans = [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]
    out: list[Span] = []
    for a, b in spans:
        if out and not text[a:b].strip():
            out[-1] = (out[-1][0], b)
        elif out and not text[out[-1][0]:out[-1][1]].strip():
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


def _merge_short(spans: list[Span], text: str, min_chars: int) -> list[Span]:
    """Pieces shorter than `min_chars` (stripped) join the next piece; the last joins the previous."""
    out = list(spans)
    i = 0
    while i < len(out) and len(out) > 1:
        a, b = out[i]
        if len(text[a:b].strip()) >= min_chars:
            i += 1
        elif i + 1 < len(out):
            out[i : i + 2] = [(a, out[i + 1][1])]
        else:
            out[i - 1 : i + 1] = [(out[i - 1][0], b)]
            break
    return out


def _spans_from(text: str, pieces: list) -> list[Span]:
    """A callable's result: step strings located in order in `text` (tiled), or spans."""
    if pieces and not isinstance(pieces[0], str):
        return _check_spans(text, [tuple(p) for p in pieces])
    ends, at = [], 0
    for piece in pieces:
        piece = piece.strip()
        if not piece:
            continue
        found = text.find(piece, at)
        if found < 0:
            raise ValueError(
                f"the step {piece[:60]!r} returned by the splitting function does not occur in the text after "
                f"offset {at}; a splitter must return pieces of the text, in order"
            )
        at = found + len(piece)
        ends.append(at)
    return _tile(text, ends[:-1])


def _check_spans(text: str, spans: list) -> list[Span]:
    """Explicit spans must be in order, non-overlapping and inside the text; gaps are allowed."""
    prev = 0
    for s in spans:
        if len(s) != 2 or not all(isinstance(x, int) for x in s):
            raise ValueError(f"a step span must be two ints (start, end); got {s!r}")
        a, b = s
        if not prev <= a <= b <= len(text):
            raise ValueError(
                f"step span {s} is out of order, overlaps the previous one or lies outside the "
                f"{len(text)}-character text; give sorted, non-overlapping (start, end) spans"
            )
        prev = b
    return [(int(a), int(b)) for a, b in spans]
