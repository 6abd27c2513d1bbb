"""Reports in a real browser (headless Chromium driven by Playwright): the page loads with no
console errors, makes no network request, mounts its circuitsvis components, and hostile tokens
stay text.

Needs Debian's `chromium` and the `playwright` Python package (no downloaded browser). Without
them the tests skip, except under CI (the CI variable set), where they fail.
"""

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from test_report import HOSTILE, hostile_report

from analyses.report import render_sweep, write

# Playwright adds --headless itself.
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
_CANDIDATES = ("/usr/lib/chromium/chromium", "/usr/bin/chromium", "chromium", "chromium-browser")


def _chromium() -> str | None:
    for name in _CANDIDATES:
        path = name if os.path.isabs(name) else shutil.which(name)
        if path and os.access(path, os.X_OK):
            return path
    return None


@pytest.fixture(scope="module")
def browser():
    """A Chromium context with a fresh profile; skip (fail under CI) when it cannot start."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is not installed (pip install -e '.[dev]')")
    exe = _chromium()
    if exe is None:
        _unavailable("no Chromium executable (apt-get install chromium)")
    with sync_playwright() as p, tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        context = p.chromium.launch_persistent_context(
            profile, executable_path=exe, headless=True, args=FLAGS
        )
        yield context
        context.close()


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"Browser test cannot run under CI: {reason}.")
    pytest.skip(f"Browser test skipped: {reason}.")


@dataclass
class Visit:
    """What a page did while it loaded."""

    page: object
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)


def _open(context, path: Path) -> Visit:
    url = path.resolve().as_uri()
    page = context.new_page()
    visit = Visit(page)
    page.on(
        "console", lambda m: visit.errors.append(m.text) if m.type in ("error", "warning") else None
    )
    page.on("pageerror", lambda e: visit.errors.append(str(e)))
    page.on("dialog", lambda d: (visit.dialogs.append(d.message), d.dismiss()))
    page.on("request", lambda r: visit.requests.append(r.url) if r.url != url else None)
    page.route(
        "**/*", lambda route: route.continue_() if route.request.url == url else route.abort()
    )
    page.goto(url, wait_until="load")
    return visit


def test_report_loads_offline_mounts_circuitsvis_and_keeps_tokens_inert(browser, tmp_path) -> None:
    path = write(hostile_report(n_cards=2, n_examples=2), tmp_path / "report.html")
    visit = _open(browser, path)
    page = visit.page
    n = page.eval_on_selector_all(".cv", "els => els.length")
    assert n == 2 * 2 * 2 * 2
    # locator assertions poll from Playwright's injected script; wait_for_function would need
    # eval, which the report's CSP forbids
    expect(page.locator(".cv[data-mounted]")).to_have_count(n)
    expect(page.locator(".cv .colored-tokens")).to_have_count(n)
    # every component drew one coloured span per token
    spans = page.eval_on_selector_all(
        ".cv .colored-tokens", "els => els.map(e => e.children.length)"
    )
    assert spans == [len(HOSTILE) + 2] * n
    # the hostile tokens are text: no element was made from them, and they read back literally
    assert page.evaluate("document.querySelectorAll('img, iframe, object, embed').length") == 0
    assert page.evaluate("document.scripts.length") == 3
    text = page.inner_text("#cv-0").replace("\u00a0", " ")
    assert all(t in text for t in HOSTILE if t.isprintable())
    page.hover("#cv-0 .colored-tokens > span:nth-child(2) > span")  # circuitsvis's tooltip
    page.wait_for_timeout(200)
    assert page.evaluate("document.querySelectorAll('img').length") == 0
    assert page.locator("svg figure, figure.chart svg").count() >= 5
    assert visit.dialogs == [] and visit.errors == [] and visit.requests == []
    page.close()


def test_sweep_report_loads_offline(browser, tmp_path) -> None:
    rows = [
        {"name": HOSTILE[k % 3], "architecture": "gated", "r2": 0.5 + k / 100, "l0": 2.0 + k}
        for k in range(30)
    ]
    (tmp_path / "sweep.json").write_text(json.dumps(rows))
    path = render_sweep(tmp_path / "sweep.json", tmp_path / "sweep.html")
    visit = _open(browser, path)
    assert visit.page.locator("figure.chart circle").count() == 30
    assert visit.page.evaluate("document.querySelectorAll('img').length") == 0
    assert visit.dialogs == [] and visit.errors == [] and visit.requests == []
    visit.page.close()
