"""The clinician page in a real headless Chromium, against `launch.py` serving the demo index.

The server starts without a users file, so the tests log in with its first-start account and the
password it prints. A second account is added to the users file while the server runs. Without
/usr/bin/chromium the tests skip, or fail when BEDSIDE_REQUIRE_BROWSER=1 (as CI sets it).
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from assistant.ui.auth import UserStore

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("BEDSIDE_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOT = REPO / "docs" / "screenshot-answer.png"
# greedy fp32 decoding answers this without figures, so the verifier keeps its citation of source [1]
IN_CORPUS = "How should the levothyroxine dose be changed when a woman with hypothyroidism becomes pregnant?"
IN_CORPUS_TITLE = "Primary Hypothyroidism"
OFF_CORPUS = "What is the boiling point of tungsten?"
# generous because the shared CI machine may be slow; a healthy run takes a fraction of these
START_TIMEOUT_S = 300
ANSWER_TIMEOUT_MS = 180_000


@dataclass
class Server:
    url: str
    passwords: dict[str, str]
    audit_db: Path
    output: list[str]
    blocked: list[str] = field(default_factory=list)


def require_browser() -> None:
    if CHROMIUM.exists():
        return
    message = f"Chromium not found at {CHROMIUM}; install the Debian `chromium` package"
    if os.environ.get("BEDSIDE_REQUIRE_BROWSER") == "1":
        pytest.fail(message + " (BEDSIDE_REQUIRE_BROWSER=1)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def server(browser, request, tmp_path_factory):
    """`launch.py` on a free loopback port with no users file at start; stopped after the module."""
    # requested here, after the browser check, so a skipped run builds no index
    demo_index_dir = request.getfixturevalue("demo_index_dir")
    folder = tmp_path_factory.mktemp("ui-server")
    users_file = folder / "users.json"
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, str(REPO / "launch.py"), "--port", str(port), "--index", str(demo_index_dir),
               "--users-file", str(users_file), "--audit-db", str(folder / "audit.db"),
               "--max-new-tokens", "24", "--dtype", "float32", "--device", "cpu"]
    process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output: list[str] = []
    # drain the pipe continuously so a full buffer never blocks the server
    reader = threading.Thread(target=lambda: output.extend(iter(process.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not any("Running on local URL" in line for line in output):
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("launch.py did not start:\n" + "".join(output))
            time.sleep(0.5)
        text = "".join(output)
        found = re.search(r"Created login account 'admin' .*? with password:\s+(\S+)", text, re.DOTALL)
        assert found, "the first start should print the new account's password:\n" + text
        admin_password = found.group(1)

        # a second account, added while the server runs: the server must pick up the changed file
        bob_password = "bob's own password"
        UserStore(users_file).set_password("bob", bob_password)
        passwords = {"admin": admin_password, "bob": bob_password}
        yield Server(url=f"http://127.0.0.1:{port}/", passwords=passwords, audit_db=folder / "audit.db",
                     output=output)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def open_page(browser, server: Server):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})

    def loopback_only(route) -> None:
        # the page must work on a network that reaches only this server
        if route.request.url.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:", "blob:")):
            route.continue_()
        else:
            server.blocked.append(route.request.url)
            route.abort()

    context.route("**/*", loopback_only)
    page = context.new_page()
    page.goto(server.url)
    return context, page


def log_in(page, user: str, password: str) -> None:
    page.locator("input[type=text]").first.fill(user)
    page.locator("input[type=password]").fill(password)
    page.get_by_role("button", name="Login").click()


def ask(page, question: str) -> None:
    box = page.locator("#bedside-question textarea")
    box.fill(question)
    box.press("Enter")


def wait_for_answers(page, count: int) -> None:
    page.wait_for_function(
        "n => document.querySelectorAll('#bedside-chat .bedside-answer').length >= n",
        arg=count, timeout=ANSWER_TIMEOUT_MS,
    )


@pytest.fixture(scope="module")
def admin_page(browser, server):
    """The first account logged in, after asking one demo-corpus question; streamed texts are recorded."""
    context, page = open_page(browser, server)
    log_in(page, "admin", server.passwords["admin"])
    page.locator("#bedside-question textarea").wait_for(timeout=60_000)
    page.evaluate("""() => {
        window.streamed = [];
        new MutationObserver(() => {
            const pieces = document.querySelectorAll('#bedside-chat .bedside-streaming .stream-text');
            if (pieces.length) window.streamed.push(pieces[pieces.length - 1].innerText);
        }).observe(document.body, {subtree: true, childList: true, characterData: true});
    }""")
    ask(page, IN_CORPUS)
    wait_for_answers(page, 1)
    yield page
    context.close()


def test_answer_streams_then_is_verified(admin_page):
    streamed = [text for text in admin_page.evaluate("window.streamed") if text.strip()]
    assert len(set(streamed)) >= 2, f"streamed text should grow token by token, saw {streamed!r}"
    final = admin_page.locator("#bedside-chat .bedside-answer").last
    assert final.locator("a.cite").count() >= 1, final.inner_html()
    assert admin_page.locator("#bedside-chat .bedside-streaming").count() == 0
    assert "Base model: SmolLM2-135M-Instruct" in final.inner_text()
    assert "decision support to be verified, not orders" in admin_page.inner_text("#bedside-disclaimer")


def test_marker_shows_exactly_its_source(admin_page):
    from playwright.sync_api import expect

    markers = admin_page.locator("#bedside-chat a.cite")
    first_marker = admin_page.locator("#bedside-chat a.cite", has_text="[1]")
    # [1] in the normal case; should a pipeline change cite another source first, that marker is checked
    marker = first_marker.first if first_marker.count() else markers.first
    source_id = marker.get_attribute("href").removeprefix("#")
    marker.click()
    source = admin_page.locator(f"#{source_id}")
    expect(source).to_be_visible()
    expect(source).to_have_class(re.compile(r"\bselected\b"))
    if source_id == "source-1-1":
        assert IN_CORPUS_TITLE in source.inner_text()
    for label in ("Issuer", "Version", "Date", "Page/section", "Support"):
        assert label in source.inner_text()
    others = admin_page.locator(f".bedside-sources .source:not(#{source_id})")
    for index in range(others.count()):
        expect(others.nth(index)).to_be_hidden()
    assert "#" not in admin_page.url, "the page script handles the marker instead of navigating"

    SCREENSHOT.parent.mkdir(exist_ok=True)
    partial = SCREENSHOT.with_suffix(".tmp.png")
    admin_page.screenshot(path=str(partial), full_page=True)
    os.replace(partial, SCREENSHOT)


def test_second_user_sees_empty_history(browser, server, admin_page):
    context, page = open_page(browser, server)
    try:
        log_in(page, "bob", server.passwords["bob"])
        page.locator("#bedside-question textarea").wait_for(timeout=60_000)
        page.locator("#bedside-user").get_by_text("bob").wait_for()
        assert page.locator("#bedside-chat [data-testid=user]").count() == 0
        assert page.locator("#bedside-chat .bedside-answer").count() == 0
        assert IN_CORPUS not in page.inner_text("body")
        # the first user's page still holds its own turn
        assert admin_page.locator("#bedside-chat [data-testid=user]").count() >= 1
    finally:
        context.close()


def test_wrong_password_rejected(browser, server):
    from playwright.sync_api import expect

    context, page = open_page(browser, server)
    try:
        log_in(page, "admin", "not the password")
        expect(page.get_by_text("Incorrect Credentials")).to_be_visible()
        assert page.locator("#bedside-question").count() == 0
    finally:
        context.close()


def test_out_of_corpus_question_abstains(admin_page, server):
    from playwright.sync_api import expect

    ask(admin_page, OFF_CORPUS)
    abstention = admin_page.locator("#bedside-chat .bedside-abstention")
    expect(abstention).to_be_visible(timeout=ANSWER_TIMEOUT_MS)
    assert "No answer: bedside abstained." in abstention.inner_text()
    assert "bedside abstained" in admin_page.inner_text("#bedside-sources")

    # feedback on the abstention lands on its audit row
    admin_page.locator("#bedside-comment textarea").fill("should have said it is out of scope sooner")
    admin_page.locator("#bedside-feedback-unsafe").click()
    expect(admin_page.locator("#bedside-feedback-status")).to_contain_text("Recorded", timeout=30_000)
    with sqlite3.connect(server.audit_db) as db:
        rows = db.execute("SELECT user, abstained, feedback, feedback_comment FROM answers "
                          "ORDER BY id").fetchall()
    assert rows[0][:2] == ("admin", 0)
    assert rows[-1] == ("admin", 1, "unsafe", "should have said it is out of scope sooner")


def test_clear_button_empties_chat_and_sources(admin_page):
    from playwright.sync_api import expect

    admin_page.locator("#bedside-chat button[aria-label='Clear']").click()
    expect(admin_page.locator("#bedside-chat [data-testid=user]")).to_have_count(0)
    expect(admin_page.locator("#bedside-sources")).to_contain_text("Sources of the answer appear here")


def test_page_requests_only_loopback(admin_page, server):
    assert server.blocked == []
