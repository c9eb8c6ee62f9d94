"""A headless Chromium driven over the DevTools protocol (websocket-client), for the web chat test.

    with Browser.launch(tmp_path) as b:
        b.navigate("http://127.0.0.1:8080/")
        print(b.eval("document.title"))
"""
from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

CANDIDATES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome", "headless_shell")


def find_chromium() -> str | None:
    """A Chromium binary: $QAQ_CHROMIUM, else the first of CANDIDATES on PATH."""
    env = os.environ.get("QAQ_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


class Browser:
    def __init__(self, proc: subprocess.Popen, ws_url: str):
        import websocket  # websocket-client

        self.proc = proc
        self.ws = websocket.create_connection(ws_url, timeout=30, suppress_origin=True)
        self._ids = itertools.count(1)

    @classmethod
    def launch(cls, workdir: Path, exe: str | None = None) -> "Browser":
        exe = exe or find_chromium()
        if exe is None:
            raise FileNotFoundError("no Chromium found")
        log = open(workdir / "chromium.log", "w+")
        proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                 "--remote-debugging-port=0", f"--user-data-dir={workdir / 'profile'}",
                                 "--window-size=1280,900", "about:blank"], stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its renderer/GPU/zygote children go with it (close)
        t0 = time.time()
        port = None
        while time.time() - t0 < 60 and port is None:
            if proc.poll() is not None:
                break
            log.seek(0)
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", log.read())
            port = int(m.group(1)) if m else None
            time.sleep(0.1)
        if port is None:
            os.killpg(proc.pid, signal.SIGKILL)
            log.seek(0)
            raise RuntimeError(f"Chromium did not start its DevTools endpoint:\n{log.read()[-2000:]}")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
        b = cls(proc, pages[0]["webSocketDebuggerUrl"])
        b.call("Page.enable")
        b.call("Runtime.enable")
        return b

    def __enter__(self) -> "Browser":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, method: str, **params) -> dict:
        """One DevTools command; its result (events that arrive meanwhile are dropped)."""
        i = next(self._ids)
        self.ws.send(json.dumps({"id": i, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def eval(self, expression: str):
        """The value of a JavaScript expression in the page (promises awaited)."""
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression[:80]}: {r['exceptionDetails'].get('text')} "
                               f"{r['exceptionDetails'].get('exception', {}).get('description', '')}")
        return r.get("result", {}).get("value")

    def navigate(self, url: str, timeout: float = 60) -> None:
        self.call("Page.navigate", url=url)
        self.wait_for("document.readyState === 'complete'", timeout)

    def wait_for(self, expression: str, timeout: float = 60, every: float = 0.1):
        """Poll until the expression is truthy; its value. TimeoutError otherwise."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            v = self.eval(expression)
            if v:
                return v
            time.sleep(every)
        raise TimeoutError(f"not true after {timeout:g} s: {expression}")

    def type_text(self, text: str) -> None:
        self.call("Input.insertText", text=text)

    def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                      nativeVirtualKeyCode=13, text="\r" if kind == "keyDown" else "")

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            # the whole process group: terminating the browser alone leaves its children running
            for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(self.proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
