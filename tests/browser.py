"""Headless Chromium driven over the Chrome DevTools protocol, for tests that read a rendered page.

Debian's `chromium` (`apt-get install chromium`) started with ``--remote-debugging-port=0``: it
picks a free port and names it on stderr, so no port is chosen before it is bound. The protocol's
websocket is aiohttp's (installed with Ray). `Browser.text(url, until)` loads a page and returns
its rendered text (``document.body.innerText``) once every string of ``until`` is in it.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    return next((path for path in map(shutil.which, CHROMIUM_NAMES) if path), None)


class Browser:
    """One headless Chromium process; `close` ends it."""

    def __init__(self, executable: str, timeout: float = 120):
        self.profile = tempfile.mkdtemp(prefix="rd-chromium-")
        self.log = Path(self.profile) / "chromium.log"
        self.proc = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--window-size=2400,1600", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self.log.open("wb"))
        deadline = time.monotonic() + timeout
        self.ws_url = None
        while self.ws_url is None:
            found = re.search(r"DevTools listening on (ws://\S+)", self.log.read_text(errors="replace"))
            if found:
                self.ws_url = found.group(1)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not start: {self.log.read_text(errors='replace')[-2000:]}")
            else:
                time.sleep(0.2)

    def text(self, url: str, until: list[str], timeout: float = 120) -> str:
        """The page's rendered text once it holds every string of ``until`` (or at ``timeout``)."""
        return asyncio.run(self._text(url, until, timeout))

    async def _text(self, url: str, until: list[str], timeout: float) -> str:
        async with aiohttp.ClientSession() as http, http.ws_connect(self.ws_url, max_msg_size=0) as ws:
            ids = iter(range(1, 1_000_000))

            async def call(method: str, session: str | None = None, **params) -> dict:
                msg_id = next(ids)
                await ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params,
                                              **({"sessionId": session} if session else {})}))
                while True:
                    reply = json.loads((await ws.receive(timeout=timeout)).data)
                    if reply.get("id") == msg_id:
                        if "error" in reply:
                            raise RuntimeError(f"{method}: {reply['error']}")
                        return reply["result"]

            target = (await call("Target.createTarget", url="about:blank"))["targetId"]
            session = (await call("Target.attachToTarget", targetId=target, flatten=True))["sessionId"]
            await call("Page.navigate", session, url=url)
            deadline = time.monotonic() + timeout
            text = ""
            while time.monotonic() < deadline:
                result = await call("Runtime.evaluate", session, expression="document.body ? document.body.innerText : ''",
                                    returnByValue=True)
                text = result["result"].get("value") or ""
                if all(s in text for s in until):
                    break
                await asyncio.sleep(0.5)
            await call("Target.closeTarget", targetId=target)
            return text

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
