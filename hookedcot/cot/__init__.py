"""Chain-of-thought anatomy: a reasoning trace as an object, and which of its steps matter.

`CoT` (a trace: prompt, reasoning, answer, steps with their tokens) and `split_steps` (Thought
Anchors' sentence rules and others); answers (`extract_answer`, `answers_match`); the measures of a
step's importance — `resample_steps` (resampling and counterfactual importance over rollouts that
share their prefix's KV cache), `force_answers`, `step_attention` (step × step attention, vertical
scores, receiver heads), `suppress_steps` (attention suppression); `generate_latent` (continuous
thought); and `analyze_cot`, which runs them all and writes a table, figures and a page.
"""

from hookedcot.cot.analysis import CoTAnalysis, analyze_cot
from hookedcot.cot.answers import answers_match, extract_answer, normalize_answer
from hookedcot.cot.attention import StepAttention, step_attention
from hookedcot.cot.forced import ForcedAnswers, force_answers
from hookedcot.cot.importance import ResamplingResult, resample_steps
from hookedcot.cot.latent import LatentTrace, generate_latent
from hookedcot.cot.rollouts import Rollout, sample_rollouts
from hookedcot.cot.similarity import ResidualSimilarity
from hookedcot.cot.steps import split_steps, step_spans
from hookedcot.cot.suppression import SuppressionResult, suppress_steps
from hookedcot.cot.trace import THINK, CoT, Step

__all__ = [
    "CoT",
    "CoTAnalysis",
    "ForcedAnswers",
    "LatentTrace",
    "ResamplingResult",
    "ResidualSimilarity",
    "Rollout",
    "Step",
    "StepAttention",
    "SuppressionResult",
    "THINK",
    "analyze_cot",
    "answers_match",
    "extract_answer",
    "force_answers",
    "generate_latent",
    "normalize_answer",
    "resample_steps",
    "sample_rollouts",
    "split_steps",
    "step_attention",
    "step_spans",
    "suppress_steps",
]
