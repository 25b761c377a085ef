"""GSM8K-style clean/corrupted problem pairs: a seeded generator, a JSON format, prompt helpers.

`generate_pairs(n, seed)` draws templated arithmetic word problems (shopping, speed, sharing,
ages, savings, reading, garden, fruit stall) and corrupts each by moving one number by ±1..±3 so
that the answer changes. Each problem carries its `answer` (int) and a chain-of-thought
`reasoning` ending "The answer is N.".

Patching needs clean and corrupted prompts of the *same token length* (position i must mean the
same thing in both runs). The generator keeps every changed number's digit count, which gives equal
lengths with digit-wise tokenizers (Qwen2, LLaMA-3's ≤3-digit chunks, SmolLM2); other tokenizers
can merge digits differently, so filter with `keep_same_length_pairs(model, pairs)` before patching.

JSON (`save_pairs` / `load_pairs`): a list of
`{"id": ..., "clean": {"question": str, "answer": int, "reasoning": str?}, "corrupted": {...}}`.
`load_pairs` also reads a flat layout `{"clean_question", "clean_answer", "corrupted_question",
"corrupted_answer", "pair_id"?}`; errors name the bad entry.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from hookedcot.interp.renamed import renamed


@dataclass
class Problem:
    question: str
    answer: int
    reasoning: str = ""
    template: str = ""
    numbers: dict[str, int] = field(default_factory=dict)


@dataclass
class ProblemPair:
    clean: Problem
    corrupted: Problem
    id: str | None = None

    @property
    def answers_differ(self) -> bool:
        return self.clean.answer != self.corrupted.answer


@dataclass(frozen=True)
class Template:
    name: str
    question: str  # str.format over the numbers, {name}, {their} and the template's words
    sample: Callable[[random.Random], dict[str, int]]
    answer: Callable[[dict[str, int]], int]
    reasoning: Callable[[dict[str, Any]], str]
    valid: Callable[[dict[str, int]], bool]
    perturb: tuple[str, ...]  # the numbers a corruption may move


def _r(rng: random.Random, lo: int, hi: int) -> int:
    return rng.randint(lo, hi)


TEMPLATES: tuple[Template, ...] = (
    Template(
        "shopping",
        "{name} buys {n} notebooks at {p} dollars each and a pen for {q} dollars. {name} pays with a "
        "{bill} dollar bill. How much change does {name} get?",
        lambda g: {"n": _r(g, 2, 9), "p": _r(g, 2, 9), "q": _r(g, 1, 9), "bill": 100},
        lambda v: v["bill"] - v["n"] * v["p"] - v["q"],
        lambda v: f"The notebooks cost {v['n']} * {v['p']} = {v['n'] * v['p']} dollars. With the pen that is "
        f"{v['n'] * v['p']} + {v['q']} = {v['n'] * v['p'] + v['q']} dollars. The change is {v['bill']} - "
        f"{v['n'] * v['p'] + v['q']} = {v['answer']} dollars.",
        lambda v: v["bill"] > v["n"] * v["p"] + v["q"],
        ("n", "p", "q"),
    ),
    Template(
        "speed",
        "{name} drives at {speed} km per hour for {hours} hours and then walks {walk} km. How many km "
        "does {name} travel in total?",
        lambda g: {"speed": _r(g, 20, 90), "hours": _r(g, 2, 9), "walk": _r(g, 1, 9)},
        lambda v: v["speed"] * v["hours"] + v["walk"],
        lambda v: f"Driving covers {v['speed']} * {v['hours']} = {v['speed'] * v['hours']} km. Adding the walk "
        f"gives {v['speed'] * v['hours']} + {v['walk']} = {v['answer']} km.",
        lambda v: True,
        ("speed", "hours", "walk"),
    ),
    Template(
        "sharing",
        "{name} bakes {trays} trays of {per} cookies and shares them equally among {k} friends. How many "
        "cookies does each friend get?",
        lambda g: {"trays": _r(g, 2, 9), "per": 6 * _r(g, 1, 4), "k": _r(g, 2, 3)},
        lambda v: v["trays"] * v["per"] // v["k"],
        lambda v: f"There are {v['trays']} * {v['per']} = {v['trays'] * v['per']} cookies. Each friend gets "
        f"{v['trays'] * v['per']} / {v['k']} = {v['answer']} cookies.",
        lambda v: (v["trays"] * v["per"]) % v["k"] == 0,
        ("trays", "per", "k"),
    ),
    Template(
        "ages",
        "{name} is {age} years old. {their_cap} brother is {diff} years older. What will the sum of their "
        "ages be in {years} years?",
        lambda g: {"age": _r(g, 5, 40), "diff": _r(g, 2, 9), "years": _r(g, 2, 9)},
        lambda v: 2 * v["age"] + v["diff"] + 2 * v["years"],
        lambda v: f"The brother is {v['age']} + {v['diff']} = {v['age'] + v['diff']} years old. In {v['years']} "
        f"years they will be {v['age'] + v['years']} and {v['age'] + v['diff'] + v['years']}, so the sum is "
        f"{v['age'] + v['years']} + {v['age'] + v['diff'] + v['years']} = {v['answer']}.",
        lambda v: True,
        ("age", "diff", "years"),
    ),
    Template(
        "savings",
        "{name} saves {s} dollars every week for {w} weeks and then spends {c} dollars on a bike. How "
        "many dollars does {name} have left?",
        lambda g: {"s": _r(g, 10, 40), "w": _r(g, 3, 9), "c": _r(g, 10, 29)},
        lambda v: v["s"] * v["w"] - v["c"],
        lambda v: f"{v['name']} saves {v['s']} * {v['w']} = {v['s'] * v['w']} dollars. After the bike "
        f"{v['s'] * v['w']} - {v['c']} = {v['answer']} dollars are left.",
        lambda v: v["s"] * v["w"] > v["c"],
        ("s", "w", "c"),
    ),
    Template(
        "reading",
        "A book has {pages} pages. {name} reads {per} pages a day for {days} days. How many pages are "
        "left to read?",
        lambda g: {"pages": _r(g, 200, 480), "per": _r(g, 10, 30), "days": _r(g, 2, 6)},
        lambda v: v["pages"] - v["per"] * v["days"],
        lambda v: f"{v['name']} reads {v['per']} * {v['days']} = {v['per'] * v['days']} pages. "
        f"{v['pages']} - {v['per'] * v['days']} = {v['answer']} pages are left.",
        lambda v: v["pages"] > v["per"] * v["days"],
        ("pages", "per", "days"),
    ),
    Template(
        "garden",
        "{name}'s garden has {rows} rows with {per} tomato plants in each row. {dead} plants die. How "
        "many tomato plants are left?",
        lambda g: {"rows": _r(g, 3, 9), "per": _r(g, 10, 20), "dead": _r(g, 2, 9)},
        lambda v: v["rows"] * v["per"] - v["dead"],
        lambda v: f"The garden has {v['rows']} * {v['per']} = {v['rows'] * v['per']} plants. After "
        f"{v['dead']} die, {v['rows'] * v['per']} - {v['dead']} = {v['answer']} are left.",
        lambda v: v["rows"] * v["per"] > v["dead"],
        ("rows", "per", "dead"),
    ),
    Template(
        "fruit",
        "A fruit stall has {boxes} boxes of {per} apples. {name} sells {am} apples in the morning and {pm} "
        "apples in the afternoon. How many apples are left?",
        lambda g: {"boxes": _r(g, 4, 9), "per": _r(g, 12, 24), "am": _r(g, 10, 30), "pm": _r(g, 10, 30)},
        lambda v: v["boxes"] * v["per"] - v["am"] - v["pm"],
        lambda v: f"The stall has {v['boxes']} * {v['per']} = {v['boxes'] * v['per']} apples. {v['name']} sells "
        f"{v['am']} + {v['pm']} = {v['am'] + v['pm']}, so {v['boxes'] * v['per']} - {v['am'] + v['pm']} = "
        f"{v['answer']} are left.",
        lambda v: v["boxes"] * v["per"] > v["am"] + v["pm"],
        ("boxes", "per", "am", "pm"),
    ),
)
TEMPLATE_NAMES = tuple(t.name for t in TEMPLATES)
NAMES = (("Sam", "his"), ("Maria", "her"), ("Tom", "his"), ("Lena", "her"), ("Omar", "his"), ("Aiko", "her"),
         ("Ben", "his"), ("Nina", "her"), ("Raj", "his"), ("Eva", "her"))


def make_problem(template: Template, numbers: dict[str, int], name: str, their: str) -> Problem:
    """The problem a template gives for these numbers (its answer recomputed from them)."""
    answer = template.answer(numbers)
    words = {**numbers, "name": name, "their": their, "their_cap": their.capitalize(), "answer": answer}
    reasoning = f"{template.reasoning(words)} The answer is {answer}."
    return Problem(template.question.format(**words), answer, reasoning, template.name, dict(numbers))


def generate_pairs(
    n: int, seed: int = 0, templates: Sequence[str] | None = None, max_delta: int = 3
) -> list[ProblemPair]:
    """`n` clean/corrupted pairs, deterministic for a given `seed` (templates taken in turn).

    The corrupted problem moves one number by ±1..±max_delta, keeping its digit count (so
    equal-length prompts under digit-wise tokenizers) and the template's constraints (positive
    answers, exact division), and always changes the answer."""
    chosen = [t for t in TEMPLATES if templates is None or t.name in templates]
    unknown = set(templates or ()) - set(TEMPLATE_NAMES)
    if unknown or not chosen:
        raise ValueError(f"unknown templates {sorted(unknown)}; choose from {list(TEMPLATE_NAMES)}")
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        template = chosen[i % len(chosen)]
        name, their = rng.choice(NAMES)
        while True:
            clean = template.sample(rng)
            corrupted = _corrupt(template, clean, rng, max_delta) if template.valid(clean) else None
            if corrupted is not None:
                break
        pairs.append(ProblemPair(make_problem(template, clean, name, their),
                                 make_problem(template, corrupted, name, their), id=f"{seed}-{i}-{template.name}"))
    return pairs


def _corrupt(template: Template, numbers: dict[str, int], rng: random.Random, max_delta: int) -> dict[str, int] | None:
    moves = [(key, d) for key in template.perturb for d in range(-max_delta, max_delta + 1) if d]
    rng.shuffle(moves)
    answer = template.answer(numbers)
    for key, d in moves:
        new = dict(numbers, **{key: numbers[key] + d})
        if new[key] < 1 or len(str(new[key])) != len(str(numbers[key])):
            continue
        if template.valid(new) and template.answer(new) != answer:
            return new
    return None


# ---------------------------------------------------------------- prompts
def format_prompt(problem: Problem | str, style: str = "qa", model: Any = None, system: str | None = None) -> str:
    """The prompt text for a problem.

    "qa": `"Q: {question}\\nA:"`; "plain": the question alone; "chat": the model's chat
    template with the question as the user turn (and `system` if given), ending with the assistant
    prefix — needs `model` (its `apply_chat_template`)."""
    question = problem.question if isinstance(problem, Problem) else problem
    if style == "qa":
        return f"Q: {question}\nA:"
    if style == "plain":
        return question
    if style == "chat":
        if model is None:
            raise ValueError("style='chat' needs the model: format_prompt(problem, 'chat', model=model)")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        return model.apply_chat_template(messages, add_generation_prompt=True)
    raise ValueError(f"style must be 'qa', 'plain' or 'chat', got {style!r}")


def keep_same_length_pairs(model: Any, pairs: Sequence[ProblemPair], style: str = "qa") -> list[ProblemPair]:
    """The pairs whose clean and corrupted prompts tokenize to the same number of tokens under
    `model`'s tokenizer (what position-wise patching needs)."""
    kept = []
    for pair in pairs:
        _, mask = model.tokenize([format_prompt(pair.clean, style, model), format_prompt(pair.corrupted, style, model)])
        if int(mask[0].sum()) == int(mask[1].sum()):
            kept.append(pair)
    return kept


same_length_pairs = renamed(keep_same_length_pairs, "same_length_pairs")


# ---------------------------------------------------------------- JSON
def save_pairs(pairs: Sequence[ProblemPair], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"id": p.id, "clean": asdict(p.clean), "corrupted": asdict(p.corrupted)} for p in pairs], indent=1))
    return path


def load_pairs(path: str | Path) -> list[ProblemPair]:
    """Read pairs from JSON (the nested layout or the flat one); raises ValueError naming
    the first bad entry and what is wrong with it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if isinstance(data, dict) and isinstance(data.get("pairs"), list):
        data = data["pairs"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of pairs, got {type(data).__name__}")
    return [_parse_pair(entry, f"{path}: entry {i}") for i, entry in enumerate(data)]


def _parse_pair(entry: Any, where: str) -> ProblemPair:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected an object with 'clean' and 'corrupted', got {type(entry).__name__}")
    pair_id = entry.get("id", entry.get("pair_id"))
    where = f"{where} (id {pair_id!r})" if pair_id is not None else where
    if "clean" in entry or "corrupted" in entry:
        sides = {side: entry.get(side) for side in ("clean", "corrupted")}
    elif "clean_question" in entry or "corrupted_question" in entry:
        sides = {side: {k: entry[f"{side}_{k}"] for k in ("question", "answer", "reasoning") if f"{side}_{k}" in entry}
                 for side in ("clean", "corrupted")}
    else:
        raise ValueError(f"{where}: needs 'clean' and 'corrupted' (or clean_question/clean_answer/corrupted_question/"
                         f"corrupted_answer); it has keys {sorted(entry)}")
    problems = {side: _parse_problem(value, f"{where}, {side}") for side, value in sides.items()}
    return ProblemPair(problems["clean"], problems["corrupted"], None if pair_id is None else str(pair_id))


def _parse_problem(value: Any, where: str) -> Problem:
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected an object with 'question' and 'answer', got {value!r}")
    question = value.get("question")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string, got {question!r}")
    if "answer" not in value:
        raise ValueError(f"{where}: 'answer' is missing")
    answer = _as_int(value["answer"])
    if answer is None:
        raise ValueError(f"{where}: 'answer' must be an integer (e.g. 42 or \"1,200\"), got {value['answer']!r}")
    numbers = value.get("numbers") or {}
    return Problem(question, answer, str(value.get("reasoning", "")), str(value.get("template", "")), dict(numbers))


def _as_int(x: Any) -> int | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if isinstance(x, str):
        s = x.strip().replace(",", "")
        if s.lstrip("-").isdigit():
            return int(s)
    return None
