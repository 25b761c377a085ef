"""Readers of the residual stream: an activation store, dictionaries (SAEs, crosscoders) attached by
hook name, feature patching between models, the tuned lens, accuracy per intervention.

`collect_activations` streams hooks of one model or two (same tokens) to safetensors shards; an
`ActivationStore` reads them back as shuffled minibatches. `load_sae` reads SAELens and EleutherAI sparsify folders; an `SAE` knows its hook name, encodes,
decodes, saves in the SAELens layout and splices itself in (`sae.hook(edit=FeatureEdit(...))`);
`TunedLens` / `train_tuned_lens` (tuned-lens' layout and safetensors; `run_logit_lens(tuned=)`);
`CrossCoder` / `train_crosscoder` read several models at one hook for model diffing (`feature_stats`,
`latent_scaling`); `FeaturePatch` puts one model's features into another's run and `JointEdit`
edits a crosscoder's joint latent, the partner model running alongside, also during generation
(`generate_with`); `evaluate_accuracy` measures a problem set's accuracy once per intervention (Wilson intervals).
"""

from hookedcot.dictionaries.crosscoder import CrossCoder, TrainingLog, fraction_of_variance_explained, train_crosscoder
from hookedcot.dictionaries.feature_analysis import FeatureStats, LatentScaling, feature_stats, latent_scaling
from hookedcot.dictionaries.feature_patch import FeaturePatch, JointEdit, Lockstep, generate_with
from hookedcot.dictionaries.evaluation import Accuracy, accuracy_table, evaluate_accuracy, load_problems, wilson_interval
from hookedcot.dictionaries.sae import SAE, FeatureEdit, load_sae, sparsify_hook_name
from hookedcot.dictionaries.store import ActivationBatch, ActivationStore, collect_activations, generations
from hookedcot.dictionaries.tuned_lens import TunedLens, train_tuned_lens

__all__ = [
    "SAE",
    "ActivationBatch",
    "ActivationStore",
    "FeaturePatch",
    "JointEdit",
    "Lockstep",
    "collect_activations",
    "generate_with",
    "generations",
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
