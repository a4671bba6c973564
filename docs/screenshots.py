"""Take the playground's screenshots in docs/ from a running `lorakit serve`.

    lorakit serve --adapter notes=runs/notes --adapter notes-r8=runs/notes-r8 --runs runs --port 8000
    python docs/screenshots.py http://127.0.0.1:8000

It drives Debian's chromium (/usr/bin/chromium) through playwright, as the browser tests do.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SYSTEM = "Convert the sales note to JSON."
PROMPT = "Met Dana Reyes from Acme about the renewal; quoted 40k; next touchpoint Fri."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="the server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--out", default=str(Path(__file__).parent), help="where the PNG files go")
    parser.add_argument("--system", default=SYSTEM)
    parser.add_argument("--prompt", default=PROMPT)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--views", default="compare,adapters,runs,server", help="which pictures to take")
    opts = parser.parse_args()
    out = Path(opts.out)
    views = opts.views.split(",")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 760})

        if "compare" in views:
            compare(page, opts, out)
        if "adapters" in views:
            page.goto(opts.url + "/#adapters")
            expect(page.locator("#adapter-table tbody tr").first).to_be_visible()
            page.screenshot(path=str(out / "playground-adapters.png"))
        if "runs" in views:
            page.goto(opts.url + "/#runs")
            expect(page.locator("figure.chart").first).to_be_visible()
            page.wait_for_timeout(1000)
            page.screenshot(path=str(out / "playground-runs.png"))
        if "server" in views:
            page.goto(opts.url + "/#server")
            page.wait_for_timeout(4500)  # two samples: a rate needs a difference
            page.screenshot(path=str(out / "playground-server.png"))
        browser.close()


def compare(page, opts: argparse.Namespace, out: Path) -> None:
    page.goto(opts.url + "/#compare")
    expect(page.locator("#columns .column").first).to_be_visible()
    page.fill("#system", opts.system)
    page.fill("#max-tokens", str(opts.max_tokens))
    page.fill("#prompt", opts.prompt)
    page.click("#send")
    expect(page.locator("#send")).to_be_enabled(timeout=1_800_000)
    page.screenshot(path=str(out / "playground-compare.png"))


if __name__ == "__main__":
    main()
