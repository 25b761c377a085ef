"""The final answer of a piece of reasoning, and when two answers are the same.

`extract_answer` looks for, in order: the last `\\boxed{...}` (nested braces balanced), the
last "the answer is ..." (also "final answer:"), the last number. `normalize_answer` makes
`1,000`, `1000.0`, `$1000` and `1000.` compare equal; non-numeric answers compare after
stripping spaces, `$`, a trailing period and case. Every part of `hookedcot.cot` that reads an
answer (rollouts, forced answers, accuracy) goes through these two functions.
"""

from __future__ import annotations

import re

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?(?:/\d+(?![\d.]))?|-?\.\d+"
_ANSWER_IS = re.compile(
    r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*[:=]|answer\s*[:=])\s*:?\s*([^\n]+)", re.IGNORECASE
)


def extract_answer(text: str | None, last_number: bool = True) -> str | None:
    """The answer `text` commits to, as written (normalise with `normalize_answer`), or None.
    `last_number=False` accepts only an explicit answer (a box or "the answer is"): what a text cut
    off mid-reasoning may be read for."""
    if not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    said = list(_ANSWER_IS.finditer(text))
    if said:
        tail = said[-1].group(1).strip()
        number = re.match(rf"\s*({_NUMBER})", tail)
        if number:
            return number.group(1)
        tail = re.split(r"(?<=[^\d])\.(?:\s|$)", tail)[0].strip()
        return tail.rstrip(".").strip() or None
    numbers = re.findall(_NUMBER, text) if last_number else []
    return numbers[-1] if numbers else None


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}`, braces balanced; an unclosed box reads to the end."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    begin = i
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[begin:i]
        i += 1
    return text[begin:]


def normalize_answer(answer: str | None) -> str | None:
    """A canonical form: numbers without commas, `$`, `+` or a zero fraction (`12.50` -> `12.5`);
    other text stripped of spaces, quotes, `*`, `$`, surrounding `\\text{}` and a trailing period, lower-cased."""
    if answer is None:
        return None
    s = answer.strip().strip("\"'`*").strip().strip("$").strip()
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    s = s.rstrip(".").strip()
    plain = s.replace(",", "").replace("$", "").lstrip("+")
    if re.fullmatch(r"-?\d+(?:\.\d+)?|-?\.\d+", plain):
        if "." in plain:
            plain = plain.rstrip("0").rstrip(".")
        if plain in ("-0", ""):
            plain = "0"
        if plain.startswith("-."):
            plain = "-0" + plain[1:]
        elif plain.startswith("."):
            plain = "0" + plain
        return plain
    return re.sub(r"\s+", "", s).lower() or None


def answers_match(a: str | None, b: str | None) -> bool:
    """True when both are present and equal after `normalize_answer`."""
    na, nb = normalize_answer(a), normalize_answer(b)
    return na is not None and na == nb
