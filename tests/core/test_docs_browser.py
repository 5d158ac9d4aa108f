"""/docs works without the internet (issue 14): Swagger UI's files come from the sidecar, not a
CDN. Checked in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven
by selenium) that can resolve no host name: the page renders the operation list, Authorize takes
an API key, and "Try it out" on ``POST /prompt`` with the example body answers 200 from a
sidecar in front of the ComfyUI double. ``scripts/test.sh`` installs Chromium when it is missing.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from comfy_sidecar.http.app import DOCS_ASSETS, DOCS_ASSETS_PATH
from tests.conftest import Backend, Sidecar, make_sidecar

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
KEY = "docs-browser-key-123"

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="Debian's chromium and chromium-driver are not installed (scripts/test.sh installs "
    "them as root: apt-get install chromium chromium-driver)",
)

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    # No network: every host name fails to resolve (a CDN URL would); 127.0.0.1 is an address.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--window-size=1400,2000",
)


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecar]:
    tmp = tmp_path_factory.mktemp("docs")
    running = make_sidecar(Backend("double", tmp / "comfy"), tmp, API_KEYS=KEY, LOG_LEVEL="info")
    running.start()
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'profile'}")
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def test_docs_assets_are_served_by_the_sidecar(sidecar: Sidecar) -> None:
    page = sidecar.get("/docs").text
    assert "cdn.jsdelivr.net" not in page and "https://" not in page.split("<body>")[0]
    for name in DOCS_ASSETS:
        assert f"{DOCS_ASSETS_PATH}/{name}" in page
        response = sidecar.get(f"{DOCS_ASSETS_PATH}/{name}")  # open: no key needed
        assert response.status_code == 200, name
        assert len(response.content) > 500, name
    assert sidecar.get(f"{DOCS_ASSETS_PATH}/nope.js").status_code == 404


def test_docs_render_and_try_it_out_offline(sidecar: Sidecar, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 30)
    browser.get(sidecar.url + "/docs")
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".opblock")))
    paths = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")]
    assert "/prompt" in paths and "/health" in paths, paths
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert loaded and all(url.startswith(sidecar.url) for url in loaded), loaded

    # Authorize with the API key (the Bearer scheme).
    browser.find_element(By.CSS_SELECTOR, ".auth-wrapper .authorize").click()
    container = wait.until(
        ec.presence_of_element_located(
            (By.XPATH, "//div[contains(@class,'auth-container')][.//*[contains(text(),'Bearer')]]")
        )
    )
    container.find_element(By.CSS_SELECTOR, "input").send_keys(KEY)
    container.find_element(By.CSS_SELECTOR, "button.authorize").click()
    browser.find_element(By.CSS_SELECTOR, ".btn-done, button.close-modal").click()

    # POST /prompt: Try it out with the example body, Execute.
    block = browser.find_element(
        By.XPATH, "//div[contains(@class,'opblock-post')][.//*[@data-path='/prompt']]"
    )
    block.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(lambda _: block.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
    block.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    body = wait.until(lambda _: block.find_element(By.CSS_SELECTOR, "textarea.body-param__text"))
    assert '"SaveImage"' in body.get_attribute("value")
    block.find_element(By.CSS_SELECTOR, "button.execute").click()
    status = WebDriverWait(browser, 60).until(
        lambda _: block.find_element(
            By.CSS_SELECTOR, ".live-responses-table .response .response-col_status"
        )
    )
    assert status.text.strip().startswith("200"), status.text
