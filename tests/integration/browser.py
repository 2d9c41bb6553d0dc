"""Headless Chromium driven over the DevTools protocol: open a page, click, read its text, screenshot.

The Prefect dashboard is a single-page app whose tabs are chosen by clicking (the `tab` query
parameter is reset while the run loads), so a plain `--dump-dom` cannot show a flow run's
subflows. This is the least that can: Debian's `chromium` (scripts/ensure_chromium.sh) and the
`websockets` client Prefect already depends on.
"""

from __future__ import annotations

import base64
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from websockets.sync.client import connect


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not found:
        raise AssertionError("headless Chromium is missing: `make test` installs it with scripts/ensure_chromium.sh")
    return found


class Browser:
    def __init__(self, profile: Path, width: int = 1600, height: int = 1200):
        profile.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--remote-debugging-port=0", f"--user-data-dir={profile}", f"--window-size={width},{height}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("Chromium did not open its DevTools port")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        request = urllib.request.Request(f"http://127.0.0.1:{port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(request, timeout=30) as response:
            target = json.load(response)
        self.ws = connect(target["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024, open_timeout=30)
        self.ids = itertools.count(1)
        self.send("Page.enable")
        self.send("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})

    def send(self, method: str, params: dict | None = None) -> dict:
        call_id = next(self.ids)
        self.ws.send(json.dumps({"id": call_id, "method": method, "params": params or {}}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == call_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        return result.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def text(self) -> str:
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            if all(n in text for n in needles):
                return text
            if time.monotonic() > deadline:
                missing = [n for n in needles if n not in text]
                raise AssertionError(f"not on the page after {timeout:.0f} s: {missing}\n--- page text ---\n{text[:3000]}")
            time.sleep(0.5)

    def click(self, label: str) -> None:
        """Click the first button, tab or link whose visible text is exactly `label`."""
        clicked = self.evaluate(
            "(() => { const want = %s; const all = document.querySelectorAll('button, [role=tab], a, li');"
            " for (const el of all) { if (el.innerText && el.innerText.trim() === want) { el.click(); return true; } }"
            " return false; })()" % json.dumps(label))
        if not clicked:
            raise AssertionError(f"nothing labelled {label!r} to click")

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
