"""A headless browser driven over the Chrome DevTools Protocol, for the tests of hookedcot's HTML pages.

Pure stdlib: the browser is started with `--remote-debugging-pipe`, reads commands on its fd 3
and writes replies and events on its fd 4, each message JSON ending in a NUL byte. Every wait has
a deadline, so a browser that hangs fails the test instead of hanging it.

    with Browser.start(find_browser()) as page:
        page.open(Path("page.html").resolve().as_uri())
        page.eval("document.title")
        page.click_element(".step[data-step='2']")
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def install_hint() -> str:
    """Why no browser was found, and how to get one."""
    chosen = os.environ.get("HOOKEDCOT_BROWSER")
    if chosen:
        looked = f"$HOOKEDCOT_BROWSER={chosen!r} is not an executable"
    else:
        looked = f"none of {', '.join(CANDIDATES)} is on PATH"
    return f"no headless browser ({looked}); install one to run this test: `apt-get install -y chromium` on Debian"


def find_browser() -> str | None:
    """$HOOKEDCOT_BROWSER if set (a path or a command name), else the first candidate on PATH."""
    chosen = os.environ.get("HOOKEDCOT_BROWSER")
    if chosen:
        return shutil.which(chosen) or (chosen if os.access(chosen, os.X_OK) else None)
    return next((path for path in map(shutil.which, CANDIDATES) if path), None)


class Browser:
    """One headless browser with one page attached (flattened session); `close` kills it."""

    def __init__(self, proc: subprocess.Popen, to_browser: int, from_browser: int, profile: tempfile.TemporaryDirectory,
                 log, deadline: float):
        self.proc, self.to_browser, self.from_browser, self.profile, self.log = proc, to_browser, from_browser, profile, log
        self.deadline = deadline
        self.buffer = b""
        self.events: list[dict] = []
        self.next_id = 0
        self.session: str | None = None

    @classmethod
    def start(cls, executable: str, timeout: float = 30.0, size: tuple[int, int] = (1280, 900)) -> "Browser":
        """Launch the browser and attach to a fresh blank page; `timeout` bounds this whole session."""
        profile = tempfile.TemporaryDirectory(prefix="hookedcot-browser-")
        cmd_read, cmd_write = _pipe_above(10)      # we write commands, the browser reads them as fd 3
        out_read, out_write = _pipe_above(10)      # the browser writes fd 4, we read
        args = [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--no-default-browser-check", "--remote-debugging-pipe",
                f"--user-data-dir={profile.name}", f"--window-size={size[0]},{size[1]}", "about:blank"]

        def onto_fds_3_and_4():  # runs in the child, before exec: dup2 leaves 3 and 4 inheritable
            os.dup2(cmd_read, 3)
            os.dup2(out_write, 4)

        log = tempfile.TemporaryFile()  # the browser's stderr: a file, so a chatty browser never blocks on it
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                close_fds=False, preexec_fn=onto_fds_3_and_4, start_new_session=True)
        os.close(cmd_read)
        os.close(out_write)
        browser = cls(proc, cmd_write, out_read, profile, log, time.monotonic() + timeout)
        try:
            targets = browser.call("Target.getTargets")["targetInfos"]
            page = next((t for t in targets if t["type"] == "page"), None)
            target = page["targetId"] if page else browser.call("Target.createTarget", url="about:blank")["targetId"]
            browser.session = browser.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            for domain in ("Page", "Runtime", "Network"):
                browser.call(f"{domain}.enable")
        except BaseException:
            browser.close()
            raise
        return browser

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, method: str, **params) -> dict:
        """Send one command (to the page once attached) and return its result; raise on a protocol error."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            message["sessionId"] = self.session
        try:
            os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        except BrokenPipeError:
            raise RuntimeError(self._exited()) from None
        while True:
            reply = self._read()
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method} failed: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def wait_for(self, event: str) -> dict:
        """The first `event` not yet consumed, reading until it comes (or the deadline passes)."""
        while True:
            for k, seen in enumerate(self.events):
                if seen["method"] == event:
                    return self.events.pop(k)
            reply = self._read()
            if "method" in reply:
                self.events.append(reply)

    def open(self, url: str) -> None:
        """Navigate and wait for the load event."""
        self.events.clear()
        result = self.call("Page.navigate", url=url)
        if result.get("errorText"):
            raise RuntimeError(f"cannot open {url}: {result['errorText']}")
        self.wait_for("Page.loadEventFired")

    def eval(self, expression: str):
        """The value of a JavaScript expression in the page (JSON-able values only)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page raised on {expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click_element(self, selector: str) -> None:
        """A real mouse click (pressed + released) at the centre of the element's box."""
        box = self.eval(f"""(() => {{
            const e = document.querySelector({json.dumps(selector)});
            if (!e) return null;
            e.scrollIntoView({{block: 'center'}});
            const r = e.getClientRects()[0];
            return {{x: r.left + r.width / 2, y: r.top + r.height / 2}};
        }})()""")
        if box is None:
            raise RuntimeError(f"no element matches {selector!r}")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left", clickCount=1)

    def requested_urls(self) -> list[str]:
        """Every URL the page asked the network stack for (Network.requestWillBeSent) so far."""
        self.call("Runtime.evaluate", expression="0")  # flush: events sent before this reply are read
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def exceptions(self) -> list[str]:
        """The text of every uncaught exception the page has thrown since it was opened."""
        self.call("Runtime.evaluate", expression="0")
        return [e["params"]["exceptionDetails"].get("exception", {}).get("description", str(e["params"]))
                for e in self.events if e["method"] == "Runtime.exceptionThrown"]

    def close(self) -> None:
        """Kill the browser's whole process group and remove its profile; safe to call twice."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        finally:
            for fd in (self.to_browser, self.from_browser):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.log.close()
            self.profile.cleanup()

    def _read(self) -> dict:
        while b"\0" not in self.buffer:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the browser did not answer in time")
            ready, _, _ = select.select([self.from_browser], [], [], left)
            if not ready:
                continue
            chunk = os.read(self.from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError(self._exited())
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def _exited(self) -> str:
        try:
            code = self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            code = "none yet"
        self.log.seek(0)
        stderr = self.log.read().decode(errors="replace")[-2000:]
        return f"the browser closed its pipe (exit code {code}); its stderr ends: {stderr}"


def _pipe_above(low: int) -> tuple[int, int]:
    """A pipe whose two ends are fds >= `low` (close-on-exec), so dup2 onto 3 and 4 cannot clobber them."""
    read, write = os.pipe()
    ends = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, low) for fd in (read, write))
    os.close(read)
    os.close(write)
    return ends
