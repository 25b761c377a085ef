"""Chat templates rendered exactly as transformers renders them, without transformers.

Templates come from checkpoints, so they are untrusted code: they run in jinja2's immutable
sandbox and see only plain JSON-like data, with the same environment transformers builds
(trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`, a non-escaping
`tojson`), so a template renders to the same string here and in `apply_chat_template`.
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
from datetime import datetime
from functools import lru_cache
from typing import Any, Mapping, Sequence

from hookedcot.errors import HookedCoTError

_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(HookedCoTError, ValueError):
    """A conversation cannot be rendered: no template, or the template rejects it."""


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    continue_final_message: bool = False,
    **kwargs: Any,
) -> str:
    """One conversation -> the prompt string. `kwargs` (special token strings, template options
    like `enable_thinking`) are visible to the template. `continue_final_message` cuts the text
    right after the last message's content, to prefill an assistant turn."""
    chat = [_plain(dict(m)) for m in messages]
    for i, message in enumerate(chat):  # transformers fills `reasoning_content` / `thinking` from each other
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            chat[i] = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    if continue_final_message:
        if not chat or not isinstance(chat[-1].get("content"), str):
            raise ChatTemplateError("continue_final_message needs a last message with string content")
        final = chat[-1]["content"]
        chat[-1]["content"] = final + _CONTINUE_TAG
    rendered = _render(
        template, messages=chat, tools=_plain(tools), documents=_plain(documents),
        add_generation_prompt=add_generation_prompt, **_plain(kwargs),
    )
    if continue_final_message:
        if final.strip() not in rendered or _CONTINUE_TAG.strip() not in rendered:
            raise ChatTemplateError("continue_final_message: the template dropped or rewrote the final message")
        at = rendered.rindex(_CONTINUE_TAG.strip())
        rendered = rendered[:at] if rendered[at: at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else rendered[:at].rstrip()
    return rendered


def _plain(value: Any) -> Any:
    """Only JSON-like data reaches a template (as transformers' `_plain_template_data`): objects
    with methods the sandbox does not know about never get in."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    for kind in (bool, str, int, float):  # subclasses (enums, numpy scalars) lose their extra methods
        if isinstance(value, kind):
            return kind(value) if kind is not str else str.__str__(value)
    if callable(getattr(value, "item", None)):  # numpy / torch scalars
        return _plain(value.item())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return f"<{type(value).__name__}>"


# A template is a program from the checkpoint; these bound what one render may cost. Released
# templates stay far below them (a long conversation renders in a few hundred range items and
# kilobytes); a template that loops or repeats without bound fails with a ChatTemplateError.
MAX_LOOP_ITEMS = 1_000_000  # items all for-loops of one render step through together (nested loops multiply)
MAX_VALUE_CHARS = 10_000_000  # a string built by *, + or ~, and the rendered prompt
MAX_ITEMS = 100_000  # a list or tuple built by * or + (each item may print as many characters)
_budget: contextvars.ContextVar[list[int]] = contextvars.ContextVar("chat_template_loop_budget")


def _render(template: str, **context: Any) -> str:
    """Compile and render, every failure of the template (syntax, `raise_exception`, a sandbox
    violation, a type error in its expressions, a bound exceeded) as a ChatTemplateError."""
    import jinja2

    if not isinstance(template, str):
        raise ChatTemplateError(f"a chat template must be a string, got {type(template).__name__}")
    try:
        compiled = _compile(template)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template does not compile ({type(exc).__name__}: {exc}); fix or replace "
                                "it (apply_chat_template(..., chat_template=...))") from exc
    token = _budget.set([MAX_LOOP_ITEMS])
    try:
        pieces, size = [], 0
        for piece in compiled.generate(**context):
            size += len(piece)
            if size > MAX_VALUE_CHARS:
                raise ChatTemplateError(f"the chat template rendered more than {MAX_VALUE_CHARS} characters; it is "
                                        "not a chat template for this conversation")
            pieces.append(piece)
        return "".join(pieces)
    except ChatTemplateError:
        raise
    except Exception as exc:  # anything the template's own code raised: it ran untrusted logic
        raise ChatTemplateError(f"the chat template failed on this conversation ({type(exc).__name__}: {exc})") from exc
    finally:
        _budget.reset(token)


def _limit(value: Any) -> int | None:
    return MAX_VALUE_CHARS if isinstance(value, str) else MAX_ITEMS if isinstance(value, (list, tuple)) else None


def _bounded(value: Any) -> Any:
    limit = _limit(value)
    if limit is not None and len(value) > limit:
        raise ChatTemplateError(f"the chat template built a value of {len(value)} items (limit {limit})")
    return value


def _check_sizes(obj: Any, args: tuple, kwargs: dict) -> None:
    """Refuse a call asked for a size past the bound before it allocates: an int argument, or a
    width written into a format string (`'{:>999999999}'.format`, `'%999999999s' % x`)."""
    import re

    numbers = [a for a in (*args, *kwargs.values()) if isinstance(a, int) and not isinstance(a, bool)]
    method = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format; the wrapper keeps the original
    fmt = obj if isinstance(obj, str) else getattr(method, "__self__", None) if getattr(method, "__name__", "") in (
        "format", "format_map") else None
    if isinstance(fmt, str):
        numbers += [int(n) for n in re.findall(r"\d{8,}", fmt)]
    if any(abs(n) > MAX_VALUE_CHARS for n in numbers):
        raise ChatTemplateError(f"the chat template asks a call for a size above {MAX_VALUE_CHARS}")


def _size_checked(fn: Any) -> Any:
    """A jinja filter that refuses size arguments past the bound (its pass_context marks kept)."""
    import functools

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        _check_sizes(None, args[1:], kwargs)
        return _bounded(fn(*args, **kwargs))

    return checked


@lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    """transformers' chat-template environment: immutable sandbox, trim/lstrip blocks, loop
    controls, a `generation` block tag, and the raise_exception / strftime_now / tojson helpers."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(Extension):
        tags = {"generation"}  # marks assistant text for masks in transformers; renders its body here

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class SafeNamespace(jinja2.utils.Namespace):
        """`namespace()` that refuses underscore names, closing a sandbox escape (as transformers does)."""

        def __init__(*args: Any, **kwargs: Any) -> None:
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                SafeNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name: str, value: Any) -> None:
            SafeNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name: Any) -> None:
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import safe_range

    class BoundedCodeGenerator(CodeGenerator):
        def visit_Concat(self, node: Any, frame: Any) -> None:  # `a ~ b`: joined, then checked against the bound
            self.write("environment.bounded_join((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """The sandbox, plus bounds on repetition (`*`, `**`), concatenation, loop iterations and
        the sizes a call may be asked for (`'x'.ljust(10**9)`, `'%9999999999s' % x`)."""

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (jinja's signature)
            _check_sizes(__obj, args, kwargs)
            return _bounded(ImmutableSandboxedEnvironment.call(__self, __context, __obj, *args, **kwargs))

        code_generator_class = BoundedCodeGenerator
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 \
                    and right * abs(left).bit_length() > 4096:
                raise ChatTemplateError(f"the chat template computes {left} ** {right}, a number too large to build")
            if operator == "%" and isinstance(left, str):
                _check_sizes(left, (), {})
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    limit = _limit(seq)
                    if limit is not None and isinstance(n, int) and len(seq) * n > limit:
                        raise ChatTemplateError(f"the chat template repeats a value {n} times (limit {limit} items)")
            return _bounded(super().call_binop(context, operator, left, right))

        @staticmethod
        def bounded_join(parts: Any) -> str:
            return _bounded(jinja2.runtime.markup_join(parts) if any(hasattr(p, "__html__") for p in parts)
                            else "".join(map(str, parts)))

    def bounded_loop(items: Any) -> Any:
        left = _budget.get([MAX_LOOP_ITEMS])
        for item in items:
            left[0] -= 1
            if left[0] < 0:
                raise ChatTemplateError(f"the chat template's loops step through more than {MAX_LOOP_ITEMS} items in one "
                                        "render")
            yield item

    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, "jinja2.ext.loopcontrols"])
    env.globals["range"] = safe_range  # jinja's own limit per call; the loops over it are counted
    env.globals["bounded_loop"] = bounded_loop
    env.filters = {name: _size_checked(f) for name, f in env.filters.items()}  # `center(10**9)` and kin
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = lambda *args, **kwargs: dict(*args, **kwargs)  # the builtin's classmethods stay out of reach
    env.globals["namespace"] = SafeNamespace
    tree = env.parse(template)
    for loop in tree.find_all(nodes.For):  # every for-loop steps through bounded_loop(its iterable)
        loop.iter = nodes.Call(nodes.Name("bounded_loop", "load"), [loop.iter], [], None, None, lineno=loop.lineno)
    return env.from_string(tree)
