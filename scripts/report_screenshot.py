"""Regenerate the report screenshots in docs/: run the demo, open its report in headless Chromium.

    python scripts/report_screenshot.py                 # writes docs/report.png and docs/object.png
    python scripts/report_screenshot.py --out /tmp/demo --docs docs

Needs Debian's chromium (``apt-get install chromium``) and playwright (the test extra); no browser is
downloaded. The pages are served from a local HTTP server; a request to any other host fails the script.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from ampel_dask.demo.run import run_demo  # noqa: E402
from ampel_dask.testing.browser import chromium, serve  # noqa: E402

WIDTH, HEIGHT = 1366, 860  # a laptop screen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="demo folder (default: a temporary one)")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs", help="where the PNGs go")
    ap.add_argument("--object", type=int, default=1, help="rank of the object whose page is shown")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp) / "demo"
        summary = run_demo(out, workers=0, progress=False, echo=lambda line: print(line, file=sys.stderr))
        report = Path(summary["report"])
        args.docs.mkdir(parents=True, exist_ok=True)
        with serve(report.parent) as base, chromium(Path(tmp) / "profile", base=base, width=WIDTH, height=HEIGHT) as (browser, problems):
            page = browser.new_page()
            page.goto(base + "index.html", wait_until="load")
            page.mouse.move(0, 0)
            page.screenshot(path=str(args.docs / "report.png"))
            link = page.locator("#candidates tbody tr td.oid a").nth(args.object - 1).get_attribute("href")
            page.goto(base + link, wait_until="load")
            page.screenshot(path=str(args.docs / "object.png"), full_page=True)
        if problems:
            print(f"report_screenshot: the pages did not load cleanly: {problems}", file=sys.stderr)
            return 1
    for name in ("report.png", "object.png"):
        print(args.docs / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
