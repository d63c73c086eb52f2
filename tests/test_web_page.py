"""The web chat page (model/serving/static/chat.html) in a real headless Chromium against a real server.

Chromium is driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``: JSON messages
separated by NUL bytes on file descriptors 3 and 4), so the test needs no Python package beyond the standard
library. It needs a Chromium binary: Debian's ``apt-get install chromium`` (Playwright's own browser builds
cannot be downloaded here), or a path in ``CHROMIUM``. Without one the test is skipped with that reason, in CI
too: ``make test`` never depends on apt.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time

import httpx
import pytest

from model.serving.infer import ChatBot
from model.serving.server import ServerThread, create_app, get_state


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "chrome"):
        if name and (path := shutil.which(name)):
            return path
    return None


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium, or set "
                                                          "CHROMIUM=/path/to/chrome): the browser test is skipped")


class Browser:
    """A headless Chromium and one page, through the DevTools protocol over pipes."""

    def __init__(self, tmp_path):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def fds():  # the child reads commands on fd 3 and writes answers on fd 4
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless=new", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
             "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check", "--window-size=1000,700",
             f"--user-data-dir={tmp_path / 'profile'}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=fds,
            close_fds=False)
        os.close(to_child_r)
        os.close(from_child_w)
        self._next = 0
        self._buf = b""
        self._answers: dict[int, dict] = {}
        self._lock = threading.Lock()
        self.session = None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")

    def send(self, method: str, timeout: float = 30, **params) -> dict:
        self._next += 1
        msg = {"id": self._next, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while self._next not in self._answers:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"no DevTools answer to {method}")
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the DevTools pipe")
            self._buf += chunk
            *messages, self._buf = self._buf.split(b"\0")
            for m in messages:
                data = json.loads(m)
                if "id" in data:
                    self._answers[data["id"]] = data
        answer = self._answers.pop(self._next)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def js(self, expression: str):
        r = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page error: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = self.js(expression)
            if v:
                return v
            time.sleep(0.05)
        raise TimeoutError(f"waited {timeout} s for {expression}")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", url=url)
        self.wait("document.readyState === 'complete' && !!document.getElementById('send')")

    def type_and_send(self, text: str) -> None:
        self.js("document.getElementById('input').focus()")
        self.send("Input.insertText", text=text)
        self.send("Input.dispatchKeyEvent", type="keyDown", key="Enter", code="Enter", windowsVirtualKeyCode=13)
        self.send("Input.dispatchKeyEvent", type="keyUp", key="Enter", code="Enter", windowsVirtualKeyCode=13)

    def screenshot(self, path) -> None:
        import base64
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)


@pytest.fixture()
def browser(tmp_path):
    b = Browser(tmp_path)
    yield b
    b.close()


ANSWERS = "JSON.stringify([...document.querySelectorAll('.msg.assistant')].map(e => e.textContent))"
IDLE = "document.getElementById('status').dataset.state === 'idle'"


def test_page_streams_multi_turn_answers_equal_to_the_api(toy_model_dir, browser, tmp_path):
    bot = ChatBot(model_dir=str(toy_model_dir), max_new_tokens=32, api_key="k3y")
    with ServerThread(create_app(bot)) as srv, httpx.Client(base_url=srv.url, timeout=60,
                                                            headers={"Authorization": "Bearer k3y"}) as c:
        assert httpx.get(srv.url + "/").status_code == 200  # the page itself needs no key
        browser.goto(srv.url + "/")
        # without the key the API refuses, and the page says so
        browser.type_and_send("你好")
        browser.wait(IDLE + " && !!document.querySelector('.msg.error')")
        assert "API key" in browser.js("document.querySelector('.msg.error').textContent")
        browser.js("document.getElementById('clear').click(); document.querySelector('.msg.error')?.remove()")
        browser.js("const k = document.getElementById('api_key'); k.value = 'k3y'; "
                   "k.dispatchEvent(new Event('change'))")

        turns = ["3加5等于多少？", "你是谁？"]
        messages = []
        for i, q in enumerate(turns):
            browser.type_and_send(q)
            browser.wait(f"{IDLE} && document.querySelectorAll('.msg.assistant').length === {i + 1}")
            shown = json.loads(browser.js(ANSWERS))[i]
            messages.append({"role": "user", "content": q})
            r = c.post("/v1/chat/completions", json={"messages": messages, "temperature": 0}).json()
            expected = r["choices"][0]["message"]["content"]
            assert shown == expected, (i, shown, expected)
            messages.append({"role": "assistant", "content": expected})
        assert expected == bot.chat(turns[1], history=[(turns[0], json.loads(browser.js(ANSWERS))[0])])
        browser.wait("document.getElementById('model').textContent === 'toy_chat'")  # from /v1/models
        browser.screenshot(tmp_path / "chat.png")
        if os.environ.get("CHATLM_SCREENSHOT"):
            shutil.copy(tmp_path / "chat.png", os.environ["CHATLM_SCREENSHOT"])
        assert (tmp_path / "chat.png").stat().st_size > 1000


def test_page_stop_button_ends_the_generation(tiny_model_dir, browser):
    """The random tiny model never emits [EOS]: only the stop button (an aborted fetch) ends its answer."""
    bot = ChatBot(model_dir=str(tiny_model_dir), max_new_tokens=3000)
    app = create_app(bot)
    with ServerThread(app) as srv:
        browser.goto(srv.url + "/")
        browser.type_and_send("你好")
        browser.wait("document.querySelector('.msg.assistant')?.textContent.length > 5")
        assert browser.js("document.getElementById('status').dataset.state") == "streaming"
        browser.js("document.getElementById('stop').click()")
        browser.wait(IDLE)
        state = get_state(app)
        deadline = time.monotonic() + 15
        while state.health()["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.health()["in_flight"] == 0 and state.health()["cancelled"] == 1
