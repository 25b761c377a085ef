"""Interpretability tools built only on the public hook API (run_with_hooks / run_with_cache /
hooks / generate): patching sweeps, causal tracing, iterative patching, attribution patching,
logit lens, ablations, steering, neuron traces, metrics, GSM8K-style data, labelled results."""

from hookedcot.interp.ablation import (
    ablate_direction, ablate_heads, ablate_mean, ablate_neurons, ablate_resample, ablate_zero, activation_mean,
    direction_ablation, head_ablation, mean_ablation, neuron_ablation, resample_ablation, zero_ablation,
)
from hookedcot.interp.attribution import attribution_patch, patch_by_attribution
from hookedcot.interp.corruption import add_noise, gaussian_noise
from hookedcot.interp.data import (
    Problem, ProblemPair, format_prompt, generate_pairs, keep_same_length_pairs, load_pairs, same_length_pairs,
    save_pairs,
)
from hookedcot.interp.iterative import (
    IterativeResult, iterative_patch, parallel_patch, patch_in_parallel, patch_iteratively,
)
from hookedcot.interp.labels import token_labels
from hookedcot.interp.lens import LENS_SOURCES, LogitLens, logit_lens, run_logit_lens
from hookedcot.interp.metrics import (
    answer_logit_difference, answer_logprob, cosine_similarity, kl_divergence, l2_distance, logit_difference,
    normalized_recovery, top1_changed,
)
from hookedcot.interp.neurons import neuron_trace, neuron_trace_generate, trace_neurons, trace_neurons_while_generating
from hookedcot.interp.patching import PatchRuns, Site, forward_patched, kl_metric, prepare_runs, run_sites
from hookedcot.interp.sweeps import (
    PATCH_COMPONENTS, naive_patch_loop, patch_components, patch_heads, patch_layer_position, patch_layers,
    patch_naively,
)
from hookedcot.interp.positions import ACCEPTED_FORMS, Positions, resolve_positions
from hookedcot.interp.results import Result
from hookedcot.interp.steering import add_vector, generate_steered, scale_direction, steer_generate
from hookedcot.interp.tracing import restoration_sweep, trace_restoration
