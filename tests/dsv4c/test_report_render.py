"""`report.html` opened in headless Chromium: every plot is laid out and draws something.

String checks on the HTML (test_cli.py) cannot see an SVG the browser refuses to draw (a bad
attribute, a NaN coordinate, a zero size); a screenshot can. Each `<svg>` is photographed on
its own and must be at least 40 px each way and put ink on more than 0.5% of its pixels in at
least three colours. The whole page is saved too, for a person to look at when it fails.

Needs the Debian package `chromium` (`.ci/run` installs it) and `playwright` (test extras),
which drives it; without them the test is skipped and says which one is missing.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest
from dsv4c_helpers import compiled

from dsv4c.cli import main

CHROMIUM_FLAGS = [
    # this machine has no network and no GPU; without these Chromium retries connections
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    pytest.skip("no headless browser: install Debian's `chromium` package (.ci/run does)")


def _ink(png: bytes) -> tuple[float, int]:
    """The share of pixels that differ from the most common colour, and how many colours."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB")
    colors = img.getcolors(maxcolors=img.width * img.height)
    background = max(colors)[0]
    return 1 - background / (img.width * img.height), len(colors)


def test_report_plots_render_in_a_browser(capsys, tmp_path: Path) -> None:
    browser_path = _chromium()
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    art = compiled("triton").save(tmp_path / "art")
    assert main(["report", str(art)]) == 0
    errors: list[str] = []

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((art / "report.html").as_uri())
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        plots = page.locator("svg")
        kinds = [plots.nth(i).get_attribute("class") or "bars" for i in range(plots.count())]
        drawn = {}
        for i, kind in enumerate(kinds):
            box = plots.nth(i).bounding_box()
            assert box and box["width"] >= 40 and box["height"] >= 40, f"{kind} plot box {box}"
            drawn[f"{i}:{kind}"] = _ink(plots.nth(i).screenshot())
        browser.close()

    assert sorted(set(kinds)) == ["bars", "dag", "roofline"], kinds
    for name, (ink, colors) in drawn.items():
        assert ink > 0.005 and colors >= 3, (
            f"plot {name} looks empty: ink {ink:.4f}, {colors} colours"
        )
    assert not errors, errors
    assert (tmp_path / "report.png").stat().st_size > 10_000
