"""A real browser for tests and screenshots: Debian's headless Chromium, driven by Playwright.

Playwright (PyPI ``playwright``, a test dependency) drives the Chromium the system installed
(``apt-get install chromium``; ``.ci/run`` does it): no browser is downloaded (``playwright install``
is never run). Pages are served by a local HTTP server so that every request has a status a test can
check; anything the page asks of another host is refused and recorded (a report needs no network).

    with serve(folder) as base, chromium(profile_dir) as browser:
        page = browser.new_page()
        page.goto(base + "index.html")
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

# as root, in a container, with no network and no display
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]  # fmt: skip


def chromium_path() -> str | None:
    """The system's Chromium (``AMPEL_DASK_CHROMIUM`` or ``chromium`` on the PATH), or None."""
    path = os.environ.get("AMPEL_DASK_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    return path if path and Path(path).exists() else None


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@contextmanager
def serve(folder: str | Path) -> Iterator[str]:
    """``folder`` over HTTP on 127.0.0.1 (a free port); yields the base URL, ending in '/'."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@dataclass
class Problems:
    """What went wrong while pages loaded: failed or refused requests, HTTP errors, script errors."""

    failed: list[str] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.failed or self.outside or self.errors)


@contextmanager
def chromium(profile_dir: str | Path, base: str | None = None, width: int = 1366, height: int = 768) -> Iterator[tuple[Any, Problems]]:
    """A headless Chromium context with a new, empty profile in ``profile_dir``; yields (context,
    problems). With ``base``, requests to any other address are refused and listed in ``problems.outside``."""
    from playwright.sync_api import sync_playwright

    exe = chromium_path()
    if exe is None:
        raise FileNotFoundError("no chromium found (apt-get install chromium, or set AMPEL_DASK_CHROMIUM)")
    problems = Problems()
    with sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(str(profile_dir), executable_path=exe, headless=True, args=FLAGS,
                                                   viewport={"width": width, "height": height})  # fmt: skip
        try:
            if base is not None:

                def route(r: Any) -> None:
                    if r.request.url.startswith(base):
                        r.continue_()
                    else:
                        problems.outside.append(r.request.url)
                        r.abort()

                ctx.route("**/*", route)
            ctx.on("requestfailed", lambda r: problems.failed.append(f"{r.url}: {r.failure}") if r.url.startswith(base or "") else None)
            ctx.on("response", lambda r: problems.failed.append(f"{r.url}: HTTP {r.status}") if r.status >= 400 else None)
            ctx.on("page", lambda page: page.on("pageerror", lambda exc: problems.errors.append(str(exc))))
            yield ctx, problems
        finally:
            ctx.close()


__all__ = ["FLAGS", "chromium_path", "serve", "chromium", "Problems"]
