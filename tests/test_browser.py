"""The demo page in a real browser: uvicorn on 127.0.0.1, headless Chromium driven by Playwright.

Chromium is the system one (`chromium` on PATH, else /usr/bin/chromium; Playwright downloads nothing).
Skipped when it is missing, unless INSTRUCTEDIT_REQUIRE_BROWSER=1 (`make test-browser`, CI
with Chromium installed), which turns the skip into a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from playwright.sync_api import Browser, Page, expect, sync_playwright

from instructedit.api import load_editor
from instructedit.models.loading import load_model
from instructedit.serve import create_app

pytestmark = [pytest.mark.browser, pytest.mark.usefixtures("one_thread")]

CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
PROMPT, TARGET = "The capital of France is", "guitar"
TIMEOUT_MS = 60_000


def _unavailable(reason: str) -> None:
    if os.environ.get("INSTRUCTEDIT_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and INSTRUCTEDIT_REQUIRE_BROWSER=1 requires the browser test to run")
    pytest.skip(f"{reason} (install it, e.g. `apt-get install chromium`, to run the browser test)")


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    if not CHROMIUM.is_file():
        _unavailable(f"{CHROMIUM} is missing")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@contextlib.contextmanager
def serving(app: object) -> Iterator[str]:
    """``app`` on a free 127.0.0.1 port in a background thread; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))  # the port is ours before uvicorn starts: no race for it
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start within 30 s")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        uv.should_exit = True
        thread.join(timeout=30)
        sock.close()


@pytest.fixture
def server(tiny_gpt2_dir: Path, tmp_path: Path, save_tiny_editor: Callable[..., Path]) -> Iterator[str]:
    """The demo app on a free 127.0.0.1 port in a background thread; yields its base URL."""
    editor = load_editor(save_tiny_editor(tiny_gpt2_dir, tmp_path / "editor", edit_lr=-1.0))  # a descending step: the edit shows
    model, tok = load_model(str(tiny_gpt2_dir))
    with serving(create_app(editor, model, tok, model_name="tiny-gpt2", editor_name="tiny-editor", allowed_hosts=["127.0.0.1"])) as url:
        yield url


def open_page(chromium: Browser, url: str) -> tuple[Page, list[str]]:
    """The demo page at ``url``, loaded and ready; the list collects the page's JavaScript errors."""
    page = chromium.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.goto(url)
    page.wait_for_selector("body[data-ready='1']")
    return page, errors


def first_token(page: Page, selector: str) -> str:
    return json.loads(page.text_content(f"{selector} li:first-child .token") or "null")


def test_edit_predict_and_roll_back_in_the_browser(chromium: Browser, server: str) -> None:
    # The tiny editor really flips the top prediction (so the page has something to show).
    original = httpx.post(f"{server}/api/predict", json={"prompt": PROMPT}).json()["top"][0]["token"]
    edited = httpx.post(f"{server}/api/edits", json={"prompt": PROMPT, "target": TARGET}).json()
    assert original != " guitar" and edited["after"]["top"][0]["token"] == " guitar"
    assert httpx.delete(f"{server}/api/edits").json()["rolled_back"] == [1]

    page, errors = open_page(chromium, server)
    assert "tiny-gpt2" in page.text_content("#info")
    assert page.locator("#task option").all_text_contents() == ["counterfact", "wikirecent", "convsent", "zsre"]
    assert page.locator("#edits li").count() == 0

    # an empty target is refused with the server's message, shown on the page
    page.fill("#prompt", PROMPT)
    page.click("#apply")
    page.wait_for_selector("#error:not(:empty)")
    assert page.text_content("#error") == "target: must not be empty"

    page.fill("#target", TARGET)
    page.select_option("#task", "counterfact")
    page.click("#apply")
    page.wait_for_selector("#after-top li")
    page.wait_for_selector("body[data-busy='0']")
    assert page.text_content("#error") == ""
    assert first_token(page, "#before-top") == original
    assert first_token(page, "#after-top") == " guitar"
    assert page.text_content("#after-says li").startswith("The model says (edit prompt): ")  # the greedy answer, the headline
    assert page.locator("#after-says li").nth(1).text_content().startswith("The model says (as written): ")
    assert "the prompt as written" in page.text_content("#result")  # which prompt the next-token list is for
    assert "top next token, as written: " in page.text_content("#edits li")
    assert page.locator("#edits li").count() == 1
    assert f"{PROMPT} → {TARGET}" in page.text_content("#edits li")

    page.click("#edits li .rollback")
    # (locators, not wait_for_function: the page's Content-Security-Policy forbids the eval that would need)
    expect(page.locator("#edits li")).to_have_count(0)
    page.wait_for_selector("body[data-busy='0']")
    assert "(rolled back)" in page.text_content("#result-title")
    assert page.is_visible("#no-edits") and page.is_disabled("#rollback-all")

    page.fill("#predict-prompt", PROMPT)
    page.click("#predict")
    page.wait_for_selector("#predict-top li")
    assert first_token(page, "#predict-top") == original
    assert httpx.get(f"{server}/api/edits").json()["edits"] == []
    assert errors == []
    page.close()


def test_user_text_is_shown_as_text_not_markup(chromium: Browser, server: str) -> None:
    page = chromium.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(server)
    page.wait_for_selector("body[data-ready='1']")
    markup = "<img src=x onerror=\"document.title='pwned'\">"
    page.fill("#prompt", f"{PROMPT} {markup}")
    page.fill("#target", markup)
    page.click("#apply")
    page.wait_for_selector("#edits li")
    assert markup in page.text_content("#edits li") and markup in page.text_content("#result-title")
    assert page.locator("#edits img, #result img").count() == 0 and page.title() != "pwned"
    page.click("#rollback-all")
    expect(page.locator("#edits li")).to_have_count(0)
    page.close()


def test_a_server_holding_neighbours_asks_for_the_subject(chromium: Browser, tiny_gpt2_dir: Path, tmp_path: Path,
                                                          save_tiny_editor: Callable[..., Path]) -> None:
    """serve --neighbours: the page says each edit holds its same-relation neighbours, labels the subject as needed, shows
    the server's refusal of an edit without one, and applies the edit with it."""
    from instructedit.editors.neighbours import Neighbours, save_subjects

    folder = save_tiny_editor(tiny_gpt2_dir, tmp_path / "ls", -1.0, ["editor.aggregation=least_squares"])
    save_subjects(folder, ["Italy", "Spain", "Norway", "Peru"])
    model, tok = load_model(str(tiny_gpt2_dir))
    app = create_app(load_editor(folder), model, tok, model_name="tiny-gpt2", allowed_hosts=["127.0.0.1"], neighbours=Neighbours(count=2))
    with serving(app) as url:
        page, errors = open_page(chromium, url)
        assert "each edit holds 2 same-relation neighbours still (give its subject)" in page.text_content("#info")
        assert page.text_content("label[for='subject']") == "Subject (named in the prompt)"
        page.fill("#prompt", PROMPT)
        page.fill("#target", TARGET)
        page.click("#apply")
        page.wait_for_selector("#error:not(:empty)")
        assert page.text_content("#error").startswith("subject: this server holds each edit's same-relation neighbours still")
        page.fill("#subject", "France")
        page.click("#apply")
        page.wait_for_selector("#edits li")
        page.wait_for_selector("body[data-busy='0']")
        assert page.text_content("#error") == "" and errors == []
        page.close()
