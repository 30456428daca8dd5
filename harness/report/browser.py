"""Open a report page in the system's headless Chromium, for the page's tests and its screenshots.

    python -m harness.report.browser <report.html> <picture.png> [--width 1400] [--height 1000]

Playwright (the `test` extra) drives the Chromium that the system has (Debian's `chromium`, or the
binary named by `$HARNESS_CHROMIUM`); nothing is downloaded. Every console message of level error
or warning, every uncaught exception and every request other than the page's own file is recorded, so
a test can say the page is self-contained and loads cleanly.
"""

from __future__ import annotations

import argparse
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    """The Chromium to drive: `$HARNESS_CHROMIUM`, else the first of `CANDIDATES` on the PATH."""
    given = os.environ.get("HARNESS_CHROMIUM")
    if given:
        return given if Path(given).is_file() else None
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


@dataclass
class Opened:
    """A page open in the browser, with what it logged and asked for."""

    page: Any  # playwright.sync_api.Page
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)


@contextmanager
def open_page(path: Path, width: int = 1400, height: int = 1000) -> Iterator[Opened]:
    """The page at `path`, loaded in headless Chromium; raises RuntimeError when none is found."""
    from playwright.sync_api import sync_playwright

    chromium = find_chromium()
    if chromium is None:
        raise RuntimeError(
            "no Chromium found: install it (apt-get install chromium) or set $HARNESS_CHROMIUM"
        )
    with sync_playwright() as p:
        # --no-sandbox: Chromium's sandbox refuses to start as root, as in containers and CI.
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            opened = Opened(page)
            page.on(
                "console",
                lambda m: (
                    opened.errors.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None
                ),
            )
            page.on("pageerror", lambda e: opened.errors.append(f"uncaught: {e}"))
            page.on("request", lambda r: opened.requests.append(r.url))
            page.goto(Path(path).resolve().as_uri(), wait_until="load")
            yield opened
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> None:
    """Command line: a screenshot of a report page (the README's picture)."""
    parser = argparse.ArgumentParser(
        prog="python -m harness.report.browser", description=__doc__.split("\n")[0]
    )
    parser.add_argument("page", type=Path)
    parser.add_argument("picture", type=Path)
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=1000)
    parser.add_argument("--at", default=None, help="scroll to this CSS selector first (e.g. '#examples')")
    args = parser.parse_args(argv)
    with open_page(args.page, args.width, args.height) as opened:
        if args.at:
            opened.page.locator(args.at).first.evaluate("node => node.scrollIntoView()")  # its top at the top
        opened.page.screenshot(path=str(args.picture))
    if opened.errors:
        raise SystemExit("the page logged: " + "; ".join(opened.errors))
    print(f"wrote {args.picture}")


if __name__ == "__main__":
    main()
