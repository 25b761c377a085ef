"""Every tool in a process of its own, so each is timed as a user running it alone would see it.

`hookedcot.retain_freed_memory()` changes glibc's allocator for the whole process, for good (and
until 2026-11-30 building a model did it); a peer timed in that process would run under
hookedcot's setting. So the parent process of a benchmark never loads a model: `start_tool` spawns
a fresh interpreter that loads one tool (`benchmarks.peers.load_tool`), and hookedcot's process
alone turns the allocator option on.

`ToolProcess` answers the `benchmarks.peers.Tool` methods: a method that returns callables (e.g.
`forward_cases`) returns stubs that run the callable in the tool's process and wait for it, so the
interleaved timer drives several processes in turn, one running at a time. Tensors travel on the
CPU both ways (moved to the tool's device there). `run(fn, *args)` runs a module-level function
`fn(tool, *args)` in the tool's process, for what needs the model itself (hookedcot's sweep).
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.peers import Unavailable

_STORED = "__stored__"
_LIVE: set["ToolProcess"] = set()  # so a question that fails half-way leaves no tool running


def close(*procs: "ToolProcess | None") -> None:
    """Stop these tools' processes (None: a tool that was not started)."""
    for proc in procs:
        if proc is not None:
            proc.close()


def close_all() -> None:
    """Stop every tool process still running (the runner calls it after each question)."""
    for proc in list(_LIVE):
        proc.close()


def start_tool(name: str, folder: Path, settings: Any) -> "ToolProcess":
    """Tool `name` loaded in a fresh process; raises Unavailable (with the child's reason) when it cannot load."""
    return ToolProcess(name, folder, settings.dtype_name, settings.device, settings.threads)


class ToolProcess:
    """One tool loaded in a spawned process, answering its `Tool` methods and `run` requests."""

    def __init__(self, name: str, folder: Path, dtype_name: str, device: str, threads: int):
        self.name, self.device = name, device
        self._conn, child = mp.get_context("spawn").Pipe()
        self._proc = mp.get_context("spawn").Process(
            target=_serve, args=(child, name, str(folder), dtype_name, device, threads), daemon=True)
        self._proc.start()
        child.close()
        _LIVE.add(self)
        try:
            self._receive()  # loaded
        except Unavailable:
            self.close()
            raise

    def _receive(self) -> Any:
        try:
            kind, value = pickle.loads(self._conn.recv_bytes())
        except EOFError:
            self.close()
            raise Unavailable(f"{self.name}'s process exited (exit code {self._proc.exitcode})") from None
        if kind == "unavailable":
            raise Unavailable(value)
        if kind == "error":
            raise RuntimeError(f"in {self.name}'s process: {value}")
        return value

    def _ask(self, *message: Any) -> Any:
        self._conn.send_bytes(pickle.dumps(_to_cpu(message)))
        return self._receive()

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """`fn(tool, *args)` in the tool's process (fn must be importable: a module-level function)."""
        return self._ask("run", fn, args)

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)

        def remote(*args: Any) -> Any:
            return _stubs(self, self._ask("method", method, args))

        return remote

    def close(self) -> None:
        _LIVE.discard(self)
        if self._proc.is_alive():
            try:
                self._conn.send_bytes(pickle.dumps(None))
            except (BrokenPipeError, OSError):
                pass
            self._proc.join(timeout=30)
            if self._proc.is_alive():
                self._proc.kill()
        self._conn.close()

    def __enter__(self) -> "ToolProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _stubs(proc: ToolProcess, value: Any) -> Any:
    """Replace the child's stored-callable markers with callables that run them there."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == _STORED:
        key = value[1]
        return lambda: proc._ask("call", key, ())
    if isinstance(value, dict):
        return {k: _stubs(proc, v) for k, v in value.items()}
    return value


def _to_cpu(value: Any) -> Any:
    return _map_tensors(value, lambda t: t.cpu())


def _map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_map_tensors(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _serve(conn: Any, name: str, folder: str, dtype_name: str, device: str, threads: int) -> None:
    """The tool's process: load, then answer requests until told to stop (None)."""
    from benchmarks.common import hookedcot_allocator, sync
    from benchmarks.peers import load_tool

    if threads:
        torch.set_num_threads(threads)
    if name == "ours":
        hookedcot_allocator()
    send = lambda *msg: conn.send_bytes(pickle.dumps(_to_cpu(msg)))  # noqa: E731
    try:
        tool = load_tool(name, Path(folder), getattr(torch, dtype_name), device)
    except Unavailable as why:
        send("unavailable", str(why))
        return
    send("ok", None)
    stored: list[Callable[[], Any]] = []

    def store(value: Any) -> Any:
        if callable(value):
            stored.append(value)
            return (_STORED, len(stored) - 1)
        if isinstance(value, dict):
            return {k: store(v) for k, v in value.items()}
        return value

    while True:
        message = pickle.loads(conn.recv_bytes())
        if message is None:
            return
        kind, target, args = _map_tensors(message, lambda t: t.to(device))
        try:
            with torch.inference_mode():
                if kind == "call":
                    stored[target]()
                    out = None
                elif kind == "run":
                    out = target(tool, *args)
                else:
                    out = store(getattr(tool, target)(*args))
                sync(device)
            send("ok", out)
        except Unavailable as why:  # a feature this tool lacks
            send("unavailable", str(why))
        except Exception as err:  # noqa: BLE001  (the parent decides what a failure means)
            send("error", f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}")


def start_reference(folder: Path, settings: Any, model: str, skipped: list[dict]) -> ToolProcess | None:
    """The reference (transformers sdpa) in its own process if the run wants it, else None; a
    reference that cannot load is recorded in `skipped` with its reason."""
    if not settings.wants("hf_sdpa"):
        return None
    try:
        return start_tool("hf_sdpa", folder, settings)
    except Unavailable as why:
        from benchmarks.common import short

        skipped.append({"model": short(model), "tool": "hf_sdpa", "reason": str(why)})
        return None
