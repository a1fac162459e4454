"""report.html in a real browser: headless Chromium loads it, every embedded chart decodes to a real
image, the page logs no console error or exception, and a full-page screenshot renders to a PNG.

Chromium is driven over the DevTools protocol on ``--remote-debugging-pipe`` (NUL-separated JSON on
file descriptors 3 and 4), so no port, websocket library or downloaded browser is needed.  ``make test``
installs Debian's ``chromium`` where it is missing; without it this test fails rather than skips.
"""

from __future__ import annotations

import base64
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

SUITE = "reasoning_gym:chain_sum?min_terms=2&max_terms=2&min_digits=1&max_digits=1&size=6&seed=1"
WIDTH = 1400
IMAGES_JS = """Promise.all(Array.from(document.images).map(i => i.decode().then(
    () => [i.complete, i.naturalWidth, i.naturalHeight, i.alt],
    e => [false, i.naturalWidth, i.naturalHeight, i.alt + ': ' + e])))"""

pytestmark = pytest.mark.slow


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("chromium is not installed: run `make test`, which installs Debian's chromium "
                    "(as root, with apt-get), or `apt-get install chromium`")
    return path


class Browser:
    """A headless Chromium with one page, spoken to over the DevTools protocol on a pipe."""

    def __init__(self, binary: str, profile: Path, timeout: float = 60.0) -> None:
        self.timeout = timeout
        to_r, self._to_w = os.pipe()  # we write commands, Chromium reads fd 3
        self._from_r, from_w = os.pipe()  # Chromium writes fd 4, we read replies and events

        def child_fds() -> None:
            r, w = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_r, from_w))  # clear of 3 and 4
            os.dup2(r, 3)
            os.dup2(w, 4)

        self._log = profile.parent / "chromium-stderr.log"  # a file, so a chatty browser never blocks
        profile.mkdir(parents=True, exist_ok=True)
        with self._log.open("wb") as log:
            self.proc = subprocess.Popen(
                [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
                 "--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                preexec_fn=child_fds, close_fds=False,
            )
        os.close(to_r)
        os.close(from_w)
        self._buf = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        try:
            targets = self.send("Target.getTargets")["targetInfos"]
            page = next((t for t in targets if t["type"] == "page"), None)
            target_id = page["targetId"] if page else self.send("Target.createTarget", url="about:blank")["targetId"]
            self.session = self.send("Target.attachToTarget", targetId=target_id, flatten=True)["sessionId"]
        except BaseException:
            self.close()
            raise

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_r], [], [], left)[0]:
                raise TimeoutError("no DevTools message from Chromium in time")
            chunk = os.read(self._from_r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe: {self.stderr()}")
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.send(method, session=True, **params)

    def wait_for(self, method: str, since: int = 0) -> dict[str, Any]:
        """The first ``method`` event from ``self.events[since:]`` on, waiting for it if need be."""
        deadline = time.monotonic() + self.timeout
        for event in self.events[since:]:
            if event.get("method") == method:
                return event
        while True:
            event = self._read_message(deadline)
            self.events.append(event)
            if event.get("method") == method:
                return event

    def open(self, url: str) -> None:
        for domain in ("Page", "Runtime", "Log"):
            self.page(f"{domain}.enable")
        self.page("Emulation.setDeviceMetricsOverride", width=WIDTH, height=900, deviceScaleFactor=1, mobile=False)
        since = len(self.events)
        self.page("Page.navigate", url=url)
        self.wait_for("Page.loadEventFired", since)

    def evaluate(self, expression: str) -> Any:
        result = self.page("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"]["value"]

    def screenshot(self) -> bytes:
        """The whole page (not just the viewport) as PNG bytes."""
        height = self.evaluate("Math.ceil(document.documentElement.scrollHeight)")
        self.page("Emulation.setDeviceMetricsOverride", width=WIDTH, height=min(int(height), 16000),
                  deviceScaleFactor=1, mobile=False)
        return base64.b64decode(self.page("Page.captureScreenshot", format="png")["data"])

    def errors(self) -> list[str]:
        """Console errors and assertions, uncaught exceptions and browser log errors (e.g. failed loads)."""
        out = []
        for e in self.events:
            method, p = e.get("method"), e.get("params", {})
            if method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
                out.append("console." + p["type"] + ": " + " ".join(str(a.get("value", a.get("description")))
                                                                   for a in p["args"]))
            elif method == "Runtime.exceptionThrown":
                d = p["exceptionDetails"]
                out.append("exception: " + d.get("exception", {}).get("description", d.get("text", "")))
            elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log ({p['entry']['source']}): {p['entry']['text']}")
        return out

    def stderr(self) -> str:
        return self._log.read_text(errors="replace")[-2000:]

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._to_w, self._from_r):
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def browser(tmp_path: Path):
    b = Browser(_chromium(), tmp_path / "chromium-profile")
    try:
        yield b
    finally:
        b.close()


def _script(items: list[Any]):
    """Half the questions answered right once the budget allows a few words of reasoning."""

    def script(prompt: str, i: int, sampling: Any) -> str:
        k, item = next((k, it) for k, it in enumerate(items) if it.question in prompt)
        if k % 2 and sampling.max_tokens > 8:
            return "so " * 5 + f"Answer: {item.gold}"
        return "I think hard and so on Answer: 999"

    return script


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from budgetlm.backends.scripted import ScriptedBackend
    from budgetlm.evals.config import EvalConfig
    from budgetlm.evals.report import write_report
    from budgetlm.evals.runner import run_eval
    from budgetlm.evals.suites import get as get_suite

    mp = pytest.MonkeyPatch()
    items = get_suite(SUITE).items()
    mp.setattr("budgetlm.evals.runner.load", lambda spec, **kw: ScriptedBackend(script=_script(items)))
    out = tmp_path_factory.mktemp("browser") / "run"
    try:
        cfg = EvalConfig(name="browser", suites=[SUITE], models=["scripted"],
                         strategies=[{"name": "sample", "params": {"temperature": 0.0}}],
                         budgets=[{"output_tokens": b} for b in (4, 8, 32)])
        run_eval(cfg, out, progress=False)
    finally:
        mp.undo()
    return write_report([out])


def test_report_renders_in_chromium_with_every_image_decoded_and_no_console_errors(
        report: Path, browser: Browser, tmp_path: Path) -> None:
    from PIL import Image, ImageStat

    html = report.read_text(encoding="utf-8")
    n_embedded = html.count('src="data:image/png;base64,')
    assert n_embedded >= 1, "report.html embeds no image"

    browser.open(report.as_uri())
    assert browser.evaluate("document.readyState") == "complete"
    images = browser.evaluate(IMAGES_JS)
    assert len(images) == n_embedded, images
    for complete, width, height, alt in images:
        assert complete and width > 100 and height > 100, f"image {alt!r} did not decode: {width}x{height}"
    assert browser.evaluate("document.querySelectorAll('table').length") >= 1

    png = browser.screenshot()
    shot = tmp_path / "report.png"
    shot.write_bytes(png)
    if os.environ.get("BUDGETLM_SCREENSHOT"):  # keep a copy to look at
        shutil.copyfile(shot, os.environ["BUDGETLM_SCREENSHOT"])
    img = Image.open(io.BytesIO(png))
    img.load()
    assert img.format == "PNG" and img.width == WIDTH and img.height > 600, (img.format, img.size)
    # Not a blank page: many distinct colours and real variation.
    assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 50
    assert max(ImageStat.Stat(img.convert("L")).stddev) > 10
    assert len(png) > 20_000

    assert browser.errors() == []


def test_the_harness_sees_broken_images_and_console_errors(browser: Browser, tmp_path: Path) -> None:
    """The checks above are not vacuous: a broken data URI and a console error are caught."""
    page = tmp_path / "broken.html"
    page.write_text('<!doctype html><title>x</title><img alt="bad" src="data:image/png;base64,iVBORw0KGgo=">'
                    "<script>console.error('boom'); null.x;</script>", encoding="utf-8")
    browser.open(page.as_uri())
    [(complete, width, _, alt)] = browser.evaluate(IMAGES_JS)
    assert not complete and width == 0 and alt.startswith("bad: EncodingError")
    errors = browser.errors()
    assert any("console.error: boom" in e for e in errors), errors
    assert any(e.startswith("exception: TypeError") for e in errors), errors
