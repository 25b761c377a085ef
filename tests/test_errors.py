"""One error family: everything hookedcot raises on purpose is a `hookedcot.HookedCoTError`, and
each specific error keeps the built-in bases it always had (so `except ValueError` still works)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hookedcot
from hookedcot import HookedCoTError
from hookedcot.cache import BatchDimError
from hookedcot.chat_template import ChatTemplateError
from hookedcot.config import ConfigError
from hookedcot.conversions import CheckpointNotFoundError, ConversionError
from hookedcot.embedded import EmbeddedModelError, UnknownEmbeddedModelError
from hookedcot.factored_matrix import FactoredShapeError
from hookedcot.hook_points import HookError, HookNameError
from hookedcot.tokenizer import TokenizerError

ROOT = Path(__file__).resolve().parents[1]

# class -> the built-in (or hookedcot) bases it had before the family existed
KEPT_BASES = {
    ConversionError: (ValueError,),
    ConfigError: (ValueError,),
    TokenizerError: (ValueError,),
    ChatTemplateError: (ValueError,),
    HookError: (RuntimeError,),
    HookNameError: (KeyError, HookError),
    EmbeddedModelError: (FileNotFoundError,),
    BatchDimError: (ValueError, AssertionError),
    FactoredShapeError: (ValueError, AssertionError, RuntimeError),
    # raised as plain FileNotFoundError / KeyError before the family existed
    CheckpointNotFoundError: (ConversionError, FileNotFoundError),
    UnknownEmbeddedModelError: (KeyError,),
}


@pytest.mark.parametrize("cls", list(KEPT_BASES), ids=lambda c: c.__name__)
def test_each_error_is_a_hookedcot_error_and_keeps_its_old_bases(cls):
    assert issubclass(cls, HookedCoTError)
    for base in KEPT_BASES[cls]:
        assert issubclass(cls, base), f"{cls.__name__} lost its base {base.__name__}"
    err = cls("what went wrong")
    assert "what went wrong" in str(err)


def test_the_base_is_exported_at_the_top_level_and_is_a_plain_exception():
    assert hookedcot.HookedCoTError is HookedCoTError and "HookedCoTError" in hookedcot.__all__
    assert HookedCoTError.__bases__ == (Exception,)  # not a ValueError: HookError is a RuntimeError


def test_every_exception_class_defined_in_the_package_is_in_the_family():
    """A new error class that forgets the family fails here (parsed, so none can hide in a module
    this test does not import)."""
    defined = {}
    for path in [*sorted((ROOT / "hookedcot").rglob("*.py")), *sorted((ROOT / "conversions").rglob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                bases = {b.id if isinstance(b, ast.Name) else getattr(b, "attr", "") for b in node.bases}
                if any(base.endswith(("Error", "Exception")) for base in bases) and not node.name.startswith("_"):
                    defined[node.name] = (path.relative_to(ROOT), bases)
    assert {"ConversionError", "ConfigError", "HookNameError"} <= set(defined)
    outside = {name: where for name, (where, bases) in defined.items()
               if name != "HookedCoTError" and not bases & ({"HookedCoTError"} | set(defined))}
    assert not outside, f"exception classes outside the HookedCoTError family: {outside}"


def test_loading_a_name_that_is_nothing_raises_from_the_family_and_stays_a_file_not_found():
    with pytest.raises(CheckpointNotFoundError) as info:
        hookedcot.HookedCoT.from_pretrained("./no/such/folder")
    assert isinstance(info.value, FileNotFoundError) and "neither an existing file or folder" in str(info.value)
    from hookedcot.embedded import embedded_model_path

    with pytest.raises(UnknownEmbeddedModelError, match="'gpt2' is not an embedded model") as info:
        embedded_model_path("gpt2")
    assert isinstance(info.value, KeyError)


def test_bad_from_pretrained_arguments_are_input_errors_and_still_value_errors(tmp_path):
    from hookedcot.inputs import InputError
    from hookedcot.loading import parse_dtype

    with pytest.raises(InputError, match="unknown dtype 'float8'"):
        parse_dtype("float8")
    with pytest.raises(InputError, match="'left' or 'right'") as info:
        hookedcot.HookedCoT.from_pretrained(str(tmp_path), default_padding_side="middle")
    assert isinstance(info.value, ValueError)
