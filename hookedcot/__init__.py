"""hookedcot: hooked Qwen2 / LLaMA / R1-Distill models for chain-of-thought interpretability."""

from hookedcot.cache import ActivationCache
from hookedcot.config import ConfigError, ModelConfig
from hookedcot.errors import HookedCoTError
from hookedcot.factored_matrix import FactoredMatrix, FactoredShapeError
from hookedcot.hook_names import HOOKS, all_hook_names, get_act_name
from hookedcot.hook_points import Hook, HookError, HookNameError, NonFiniteError
from hookedcot.hooked import HookedCoT
from hookedcot.inputs import InputError
from hookedcot.kv_cache import KVCache
from hookedcot.memory import retain_freed_memory
from hookedcot.tl_kv_cache import HookedTransformerKeyValueCache

__all__ = [
    "ActivationCache",
    "ConfigError",
    "FactoredMatrix",
    "FactoredShapeError",
    "HOOKS",
    "Hook",
    "HookError",
    "HookNameError",
    "HookedCoT",
    "HookedCoTError",
    "HookedTransformerKeyValueCache",
    "InputError",
    "KVCache",
    "ModelConfig",
    "NonFiniteError",
    "all_hook_names",
    "get_act_name",
    "retain_freed_memory",
]
__version__ = "0.1.0"
