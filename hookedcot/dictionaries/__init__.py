"""Readers of the residual stream: dictionaries (SAEs) attached by hook name, and the tuned lens.

`load_sae` reads SAELens and EleutherAI sparsify folders; an `SAE` knows its hook name, encodes,
decodes, saves in the SAELens layout and splices itself in (`sae.hook(edit=FeatureEdit(...))`);
`TunedLens` / `train_tuned_lens` (tuned-lens' layout and safetensors; `run_logit_lens(tuned=)`);
`CrossCoder` / `train_crosscoder` read several models at one hook for model diffing (`feature_stats`,
`latent_scaling`); `evaluate_accuracy` measures a problem set's accuracy once per intervention (Wilson intervals).
"""

from hookedcot.dictionaries.crosscoder import (CrossCoder, FeatureStats, LatentScaling, TrainingLog, feature_stats,
                                               fraction_of_variance_explained, latent_scaling, train_crosscoder)
from hookedcot.dictionaries.evaluation import Accuracy, accuracy_table, evaluate_accuracy, load_problems, wilson_interval
from hookedcot.dictionaries.sae import SAE, FeatureEdit, load_sae, sparsify_hook_name
from hookedcot.dictionaries.tuned_lens import TunedLens, train_tuned_lens

__all__ = [
    "SAE",
    "CrossCoder",
    "FeatureStats",
    "LatentScaling",
    "TrainingLog",
    "Accuracy",
    "TunedLens",
    "FeatureEdit",
    "accuracy_table",
    "evaluate_accuracy",
    "feature_stats",
    "fraction_of_variance_explained",
    "latent_scaling",
    "load_problems",
    "load_sae",
    "sparsify_hook_name",
    "train_crosscoder",
    "train_tuned_lens",
    "wilson_interval",
]
