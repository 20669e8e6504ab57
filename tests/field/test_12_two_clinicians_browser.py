"""Field case 12: two clinicians in two browser sessions at once.

Expected: neither sees the other's questions or answers, in the page or in the prompt sent to the
model. The page runs in a real headless Chromium against the app served on loopback from this
process, so the test can read every prompt the model receives. The clinicians are invented.
"""

from __future__ import annotations

import pytest
from field_helpers import RecordingGenerator
from test_ui_browser import Server, ask, browser, free_port, log_in, open_page, wait_for_answers  # noqa: F401

pytestmark = pytest.mark.browser

PASSWORDS = {"dr_amsel": "amsel's own password", "dr_birch": "birch's own password"}
QUESTIONS = {
    "dr_amsel": ["How should the levothyroxine dose be changed when a woman with hypothyroidism becomes "
                 "pregnant?",
                 "How soon should thyroid function be rechecked after a levothyroxine dose change?"],
    "dr_birch": ["When should anticoagulation be offered to a man with atrial fibrillation?",
                 "Which CHA2DS2-VASc score prompts anticoagulation in women with atrial fibrillation?"],
}


@pytest.fixture(scope="module")
def recorded_server(browser, demo_assistant, tmp_path_factory):  # noqa: F811
    """The clinician page for two accounts, served from this process on a free loopback port."""
    from assistant.answer.pipeline import Assistant
    from assistant.audit import AuditLog
    from assistant.config import Settings
    from assistant.ui.app import build_app, launch_options
    from assistant.ui.auth import UserStore

    folder = tmp_path_factory.mktemp("case-12")
    users = UserStore(folder / "users.json")
    for name, password in PASSWORDS.items():
        users.set_password(name, password)
    generator = RecordingGenerator(demo_assistant.generator)
    settings = Settings(index_dir=demo_assistant.settings.index_dir, dtype="float32", device="cpu",
                        max_new_tokens=16, audit_db=folder / "audit.db")
    assistant = Assistant(settings, demo_assistant.retriever, generator, audit=AuditLog(settings.audit_db))
    app = build_app(assistant)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, auth=users.verify, prevent_thread_lock=True,
               quiet=True, **launch_options())
    try:
        yield Server(url=f"http://127.0.0.1:{port}/", passwords=PASSWORDS, audit_db=settings.audit_db,
                     output=[]), generator
    finally:
        app.close()


def test_sessions_never_share_history(browser, recorded_server):  # noqa: F811
    server, generator = recorded_server
    pages = {}
    contexts = []
    try:
        for name in PASSWORDS:
            context, page = open_page(browser, server)
            contexts.append(context)
            log_in(page, name, PASSWORDS[name])
            page.locator("#bedside-question textarea").wait_for(timeout=60_000)
            pages[name] = page

        # interleaved turns: amsel, birch, amsel, birch
        for turn in range(2):
            for name, page in pages.items():
                ask(page, QUESTIONS[name][turn])
                wait_for_answers(page, turn + 1)

        for name, page in pages.items():
            other = next(n for n in PASSWORDS if n != name)
            chat = page.inner_text("#bedside-chat")
            for question in QUESTIONS[name]:
                assert question in chat, name
            for question in QUESTIONS[other]:
                assert question not in page.inner_text("body"), (name, question)
            assert page.locator("#bedside-chat .bedside-answer").count() == 2
    finally:
        for context in contexts:
            context.close()

    # prompts in queue order: amsel 1, birch 1, amsel 2, birch 2
    assert len(generator.prompts) == 4
    for position, name in enumerate(list(PASSWORDS) * 2):
        other = next(n for n in PASSWORDS if n != name)
        prompt_text = "\n".join(message["content"] for message in generator.prompts[position])
        assert QUESTIONS[name][position // 2] in prompt_text
        for question in QUESTIONS[other]:
            assert question not in prompt_text, (position, name)
    # the second prompt of each clinician carries that clinician's own first turn as history
    for position, name in ((2, "dr_amsel"), (3, "dr_birch")):
        history = [m["content"] for m in generator.prompts[position][1:-1]]
        assert QUESTIONS[name][0] in history
    assert server.blocked == []
