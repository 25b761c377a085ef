"""The CoT object: Thought Anchors' sentence rules, other step rules, answers, the token <-> step
map, save/load, and forced answering against direct forwards on the concatenated sequence."""

from __future__ import annotations

import re

import pytest
import torch

from hookedcot.cot import CoT, answers_match, extract_answer, normalize_answer, split_steps, step_spans
from hookedcot.cot.forced import force_answers

TEXTS = [
    "Okay, so 2.5 times 4 is 10. That is 10!  Wait.\n\nLet me check: 10 / 4 = 2.5 ok\nyes.\nSo the answer is 10",
    "First, add. Then multiply by 3.5 to get it? Yes!\n\n\nDone. ok. The result is 42 apples",
    "One sentence without any end",
    "Hi. Hello there friend. Ok",
    "a.b.c. is not split inside. But this is. And this",
    "Short. Tiny. Also small. Then a much longer sentence follows here.",
]


def thought_anchors_oracle(text: str) -> list[str]:
    """Thought Anchors' splitting written out character by character (after utils.py's
    split_solution_into_chunks), except that the trailing piece is kept."""
    chunks, current = [], ""
    for i, ch in enumerate(text):
        current += ch
        paragraph = text[i : i + 2] == "\n\n"
        sentence = ch in ".?!" and i + 1 < len(text) and text[i + 1].isspace()
        if paragraph or sentence:
            if current.strip():
                chunks.append(current.strip())
            current = ""
    if current.strip():
        chunks.append(current.strip())  # the repository drops this one
    i = 0
    while i < len(chunks) and len(chunks) > 1:
        if len(chunks[i]) >= 10:
            i += 1
        elif i + 1 < len(chunks):
            chunks[i : i + 2] = [chunks[i] + " " + chunks[i + 1]]
        else:
            chunks[i - 1 : i + 1] = [chunks[i - 1] + " " + chunks[i]]
            break
    return chunks


def squash(s: str) -> str:
    return " ".join(s.split())


@pytest.mark.parametrize("text", TEXTS)
def test_sentence_steps_follow_thought_anchors_rules_and_keep_the_trailing_piece(text):
    assert [squash(s) for s in split_steps(text)] == [squash(s) for s in thought_anchors_oracle(text)]


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("rule", ["sentences", "lines", "re:, ", re.compile(r"\d")])
def test_step_spans_tile_the_text_exactly(text, rule):
    spans = step_spans(text, rule)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a < b for a, b in spans) and all(b == c for (_, b), (c, _) in zip(spans, spans[1:]))
    assert all(text[a:b].strip() for a, b in spans)


def test_sentence_rules_on_fixed_texts():
    assert split_steps("It costs 2.5 dollars. So two cost 5.0 dollars.") == ["It costs 2.5 dollars.", "So two cost 5.0 dollars."]
    assert split_steps("First paragraph here\n\nsecond paragraph here") == ["First paragraph here", "second paragraph here"]
    assert split_steps("Ok. Then we are done here. Right") == ["Ok. Then we are done here. Right"]  # short pieces merge
    assert split_steps("We have a long first one. Yes.") == ["We have a long first one. Yes."]  # last short one joins the previous
    assert split_steps("Add them up. The total is 7") == ["Add them up.", "The total is 7"]  # unpunctuated tail kept
    assert split_steps("   \n ") == [] and split_steps("x") == ["x"]


def test_other_step_rules():
    text = "line one\nline two\n\nline three"
    assert split_steps(text, "lines") == ["line one", "line two", "line three"]
    assert split_steps("a; b; c", "re:; ") == ["a;", "b;", "c"]
    assert split_steps("alpha beta gamma", lambda t: t.split()) == ["alpha", "beta", "gamma"]
    assert split_steps("alpha beta", [(0, 5), (6, 10)]) == ["alpha", "beta"]
    with pytest.raises(ValueError, match="unknown step rule"):
        split_steps(text, "paragraphs")
    with pytest.raises(ValueError, match="overlaps"):
        step_spans("alpha beta", [(0, 6), (5, 10)])
    with pytest.raises(ValueError, match="does not occur"):
        step_spans("alpha beta", lambda t: ["beta", "alpha"])


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{2}} done", r"\frac{1}{2}"),
    (r"\boxed{3} then later \boxed{4}", "4"),
    ("The answer is 1,000.", "1,000"),
    ("the final answer is: blue.", "blue"),
    ("We get 3 then 4.0 apples", "4.0"),
    ("answer: 1/2", "1/2"),
    ("The answer is 12/5 = 2.4", "12/5"),
    ("no answer here", None),
    ("", None),
])
def test_answer_extraction(text, expected):
    assert extract_answer(text) == expected


def test_numeric_answers_compare_after_normalisation():
    assert normalize_answer("1,000") == normalize_answer("1000.0") == normalize_answer("$1000") == "1000"
    assert normalize_answer("12.50") == "12.5" and normalize_answer(".5") == "0.5" and normalize_answer("\"2\"") == "2"
    assert answers_match("5", " 5.") and answers_match("\\text{Blue}", "blue")
    assert not answers_match("5", "50") and not answers_match(None, None)


# ----------------------------------------------------------------------- tokens <-> steps
PROMPT = "Q: Tom has 3 apples and buys 2 more. How many apples does he have?\nA:"
COMPLETION = " Tom starts with 3 apples. He buys 2 more apples. So 3 + 2 = 5 apples in total. The answer is 5."


def check_token_map(cot: CoT) -> None:
    """Spans tile the reasoning's tokens; each token's first non-space character is in its step;
    every token with a non-space character inside the reasoning belongs to a step."""
    assert all(a.tokens[1] == b.tokens[0] for a, b in zip(cot.steps, cot.steps[1:]))
    r0, r1 = cot.reasoning_chars
    for pos, (lo, hi) in enumerate(cot.token_chars):
        inside = cot.text[max(lo, r0):min(hi, r1)]
        if inside.strip():
            assert cot.step_of(pos) is not None, (pos, cot.text[lo:hi])
    for step in cot.steps:
        for pos in step.positions:
            lo, hi = cot.token_chars[pos]
            lo = max(lo, cot.reasoning_chars[0])
            piece = cot.text[lo:hi]
            first = lo + len(piece) - len(piece.lstrip()) if piece.strip() else lo
            assert step.chars[0] <= first < step.chars[1], (pos, piece, step)


def test_steps_know_their_tokens(smol_model):
    cot = CoT.from_text(smol_model, PROMPT, COMPLETION, think=None, correct_answer="5")
    assert cot.step_texts == split_steps(COMPLETION)
    check_token_map(cot)
    assert [smol_model.to_string(cot.tokens[slice(*s.tokens)]).strip() for s in cot.steps] == cot.step_texts
    assert cot.answer == "5" and cot.is_correct
    assert cot.prefix(0) == cot.tokens[: cot.prompt_len] and cot.prefix(cot.n_steps) == cot.tokens
    assert cot.step_of(cot.steps[2].tokens[0]) == 2 and cot.step_of(0) is None


def test_think_delimiters_in_the_completion_or_at_the_end_of_the_prompt(smol_model):
    body = "We add 3 and 2 together. That gives 5 apples."
    cot = CoT.from_text(smol_model, PROMPT, f" <think>\n{body}\n</think>\n\nThe answer is \\boxed{{5}}.")
    assert cot.reasoning == body and cot.answer_text == "The answer is \\boxed{5}." and cot.answer == "5"
    assert cot.step_texts == split_steps(body)
    check_token_map(cot)
    r1 = CoT.from_text(smol_model, PROMPT + " <think>\n", f"{body}\n</think>\n\n\\boxed{{5}}")
    assert r1.reasoning == body and r1.answer == "5"
    unfinished = CoT.from_text(smol_model, PROMPT + "<think>", body)  # no closing tag: reasoning runs to the end
    assert unfinished.reasoning == body and unfinished.answer_text == ""
    custom = CoT.from_text(smol_model, PROMPT, f"[R]{body}[/R] 5", think=("[R]", "[/R]"))
    assert custom.reasoning == body and custom.answer == "5"


def test_a_split_inside_a_token_gives_the_token_to_the_step_where_its_text_starts(smol_model):
    body = "Tom counts the apples carefully and finds five"
    cut = body.index("apples") + 3  # explicit span boundary in the middle of " apples"
    cot = CoT.from_text(smol_model, PROMPT, " " + body, think=None, steps=[(0, cut), (cut, len(body))])
    apples = next(p for p in range(cot.prompt_len, len(cot.tokens)) if cot.text[slice(*cot.token_chars[p])] == " apples")
    assert cot.step_of(apples) == 0
    assert cot.steps[0].chars[1] - cot.reasoning_chars[0] == cut and cot.steps[1].tokens[0] == apples + 1
    check_token_map(cot)


def test_generated_trace_and_save_load_round_trip(smol_model, tmp_path):
    cot = CoT.generate(smol_model, "What is 3 + 2?", max_new_tokens=24, correct_answer="5")
    assert cot.tokens[: cot.prompt_len] == smol_model.to_tokens(smol_model.apply_chat_template(
        [{"role": "user", "content": "What is 3 + 2?"}]))[0].tolist()
    check_token_map(cot)
    loaded = CoT.load(cot.save(tmp_path / "cot.json"))
    assert loaded.to_dict() == cot.to_dict()
    assert [s.tokens for s in loaded.steps] == [s.tokens for s in cot.steps]
    with pytest.raises(ValueError, match="not a saved CoT"):
        CoT.from_dict({"tokens": []})


# ----------------------------------------------------------------------- forced answering
def test_forced_logprob_equals_a_direct_forward_on_the_concatenated_text(smol_model):
    cot = CoT.from_text(smol_model, PROMPT, COMPLETION, think=None, correct_answer="5")
    forcing, answer = " So the final answer is", " 5"
    out = force_answers(smol_model, cot, forcing=forcing, answer=answer, answer_tokens=4)
    tok = smol_model.tokenizer
    cut_text = [cot.text[: cot.token_chars[n - 1][1]] for n in out.cut_tokens]
    for k in sorted({0, cot.n_steps // 2, cot.n_steps}):
        text = cut_text[k]
        ids = smol_model.to_tokens(text + forcing + answer)[0]
        n_answer = len(tok.encode(answer, add_special_tokens=False))
        assert ids[:-n_answer].tolist()[-len(tok.encode(forcing, add_special_tokens=False)):] == tok.encode(forcing, add_special_tokens=False)
        logp = torch.log_softmax(smol_model(ids[None])[0].double(), -1)
        direct = sum(float(logp[len(ids) - n_answer - 1 + j, ids[len(ids) - n_answer + j]]) for j in range(n_answer))
        assert out.logprob[k] == pytest.approx(direct, abs=1e-4)
        greedy = smol_model.generate(ids[None, : len(ids) - n_answer], 4, stop_at_eos=False)[0, len(ids) - n_answer :]
        assert out.forced_answer[k] == extract_answer(forcing + tok.decode(greedy.tolist()))
    assert out.importance == pytest.approx([b - a for a, b in zip(out.logprob, out.logprob[1:])])


def test_forced_answers_do_not_depend_on_the_batching(smol_model):
    cot = CoT.from_text(smol_model, PROMPT, COMPLETION, think=None, correct_answer="5")
    one_batch = force_answers(smol_model, cot)
    row_by_row = force_answers(smol_model, cot, memory_budget=1)
    assert row_by_row.logprob == pytest.approx(one_batch.logprob, abs=1e-4)
    assert row_by_row.forced_answer == one_batch.forced_answer
    assert one_batch.forcing == "\n\nTherefore, the final answer is \\boxed{"  # no think block: no </think>


# ----------------------------------------------------------------------- rollout answers
def test_a_rollout_is_read_with_the_reasoning_it_completes(smol_model):
    from hookedcot.cot.importance import rollout_outcome
    from hookedcot.cot.rollouts import Rollout

    cot = CoT.from_text(smol_model, PROMPT, COMPLETION, think=None, correct_answer="5")
    last = cot.n_steps  # after "The answer is 5.": the prefix already states the answer
    ended = Rollout(0, 1, [], "", None, "eos")
    assert rollout_outcome(cot, last, ended) == "5"
    cut_off = Rollout(0, 1, [], " Then we count 12 more and", None, "length")
    assert rollout_outcome(cot, 1, cut_off) is None  # a number mid-reasoning is not an answer
    assert rollout_outcome(cot, 1, Rollout(0, 1, [], " So it is 7 apples.", None, "eos")) == "7"
    assert rollout_outcome(cot, 1, Rollout(0, 1, [], " The answer is 6 and we", None, "length")) == "6"
    think = CoT.from_text(smol_model, PROMPT, " <think>\nWe add 3 and 2 together. That gives 5 apples.\n</think> 5")
    closed = Rollout(0, 1, [], " Or 4 apples.</think> The answer is \\boxed{4}", None, "eos")
    assert rollout_outcome(think, 1, closed) == "4"


def test_correct_answers_are_strings_and_a_trace_without_delimiters_has_no_think_block(smol_model):
    cot = CoT.from_text(smol_model, PROMPT, COMPLETION, correct_answer=5)
    assert cot.correct_answer == "5" and cot.is_correct and cot.think is None
    assert force_answers(smol_model, cot, answer_tokens=0).forcing.startswith("\n\nTherefore")
