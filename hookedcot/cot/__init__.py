"""Chain-of-thought anatomy: a reasoning trace as an object, and which of its steps matter.

`CoT` (a trace: prompt, reasoning, answer, steps with their tokens), `split_steps` (Thought
Anchors' sentence rules and others), answer extraction, and the measures of step importance.
"""

from hookedcot.cot.answers import answers_match, extract_answer, normalize_answer
from hookedcot.cot.steps import split_steps, step_spans
from hookedcot.cot.trace import THINK, CoT, Step

__all__ = [
    "CoT",
    "Step",
    "THINK",
    "answers_match",
    "extract_answer",
    "normalize_answer",
    "split_steps",
    "step_spans",
]
