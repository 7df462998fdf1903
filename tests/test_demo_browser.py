"""The demo in a real browser: Debian's Chromium driven by Playwright (no browser download), loopback only.

Skips when chromium or playwright is missing. The screenshot lands in tests/artifacts/ (git-ignored).
"""

import shutil
from pathlib import Path

import pytest

from test_t2v import tiny_pipeline

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
sync_api = pytest.importorskip("playwright.sync_api")
demo = pytest.importorskip("omniar.commands.demo")

ARTIFACTS = Path(__file__).parent / "artifacts"
PROMPT = "a yellow square moves down on a black background"
# no sandbox (CI runs as root in a container); nothing phones home from the test browser
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-default-apps", "--disable-domain-reliability", "--no-first-run",
                 "--disable-features=Translate,OptimizationHints,MediaRouter", "--metrics-recording-only"]


@pytest.fixture(scope="module")
def url():
    app = demo.launch(tiny_pipeline(), port=None, block=False)
    try:
        yield app.local_url
    finally:
        app.close()


def test_type_prompt_generate_and_screenshot(url):
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(url, timeout=60_000)
            page.locator("#prompt textarea").fill(PROMPT)
            page.locator("#generate").click()
            video = page.wait_for_selector("#video video", timeout=120_000)
            assert video.get_attribute("src")
            sync_api.expect(page.locator("#stats")).to_contain_text("tokens/s", timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "demo_browser.png"), full_page=True)
        finally:
            browser.close()
    assert (ARTIFACTS / "demo_browser.png").stat().st_size > 10_000
