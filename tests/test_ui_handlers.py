"""UI handlers, login accounts and launch checks, without a browser: real model, index and SQLite."""

from __future__ import annotations

import copy
import importlib.util
import io
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from assistant.answer.citations import Citation, SentenceCheck
from assistant.answer.pipeline import Answer
from assistant.errors import BedsideError
from assistant.ui import handlers
from assistant.ui.auth import UserStore, create_first_account

REPO = Path(__file__).resolve().parents[1]
IN_CORPUS = "How should the levothyroxine dose be changed when a woman with hypothyroidism becomes pregnant?"
OFF_CORPUS = "What is the boiling point of tungsten?"


def load_launch_module():
    spec = importlib.util.spec_from_file_location("bedside_launch", REPO / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RecordingAssistant:
    """The real assistant, with the keyword arguments of each `ask_stream` call kept for inspection."""

    def __init__(self, assistant) -> None:
        self.assistant = assistant
        self.calls: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.assistant, name)

    def ask_stream(self, question, **kwargs):
        self.calls.append({"question": question, **kwargs})
        return self.assistant.ask_stream(question, **kwargs)


@pytest.fixture(scope="module")
def short_assistant(demo_assistant):
    """The shared demo assistant with a 16-token budget for this module, restored afterwards."""
    saved = demo_assistant.generation.max_new_tokens
    demo_assistant.generation.max_new_tokens = 16
    yield demo_assistant
    demo_assistant.generation.max_new_tokens = saved


@pytest.fixture(scope="module")
def answered(short_assistant):
    """Every reply of one in-corpus question asked in a fresh session by user alice."""
    replies = list(handlers.respond(short_assistant, IN_CORPUS, "auto", handlers.new_session(), "alice"))
    return replies


def make_answer(text: str, sentences: list[SentenceCheck], flags: list[dict], citations: list[Citation],
                abstained: bool = False, adapter: dict | None = None) -> Answer:
    base = {"name": None, "specialty": None, "sha256": None, "reason": "no adapter"}
    return Answer(question="q <b>bold</b>", answer=text, abstained=abstained, citations=citations,
                  flags=flags, dropped_chunks=[], model="SmolLM2-135M-Instruct", model_fingerprint="f" * 64,
                  adapter=adapter or base, index_version="v20250101T000000-abcd", timings={},
                  sentences=sentences)


def make_citation(marker: int, text: str = "Give 0.1 units/kg/hour of insulin. Check ketones.") -> Citation:
    return Citation(marker=marker, chunk_id=f"doc#{marker}", doc_id="doc", title=f"Guideline {marker}",
                    source="doc.md", text=text, section="Insulin", page=None, date="2024-07-22",
                    issuer="Demo Group", version="2024.2", support=0.71)


# streaming and the verified answer

def test_respond_streams_then_verifies(answered):
    first_messages, _, _ = answered[0]
    assert first_messages[-1]["role"] == "assistant"
    assert "not yet verified" in first_messages[-1]["content"]
    streamed = [m[-1]["content"] for m, _, _ in answered[1:-1]]
    assert len(streamed) >= 2, "tokens should arrive as several replies"
    assert all("bedside-streaming" in bubble for bubble in streamed)
    assert all(sources is None for _, _, sources in answered[1:-1]), "the panel changes only at the end"
    final_messages, session, _ = answered[-1]
    assert [m["role"] for m in final_messages] == ["user", "assistant"]
    assert "bedside-answer" in final_messages[-1]["content"]
    assert "not yet verified" not in final_messages[-1]["content"]


def test_respond_records_turn_and_audit_row(answered, short_assistant):
    _, session, _ = answered[-1]
    assert session["user"] == "alice"
    [turn] = session["turns"]
    assert turn["question"] == IN_CORPUS
    assert turn["audit_id"] is not None
    row = next(r for r in short_assistant.audit.rows() if r["id"] == turn["audit_id"])
    assert row["user"] == "alice"
    assert row["question"] == IN_CORPUS


def test_markers_link_to_sources(answered):
    messages, _, sources = answered[-1]
    bubble = messages[-1]["content"]
    targets = set(re.findall(r'href="#(source-1-\d+)"', bubble))
    assert targets, "the demo answer should cite at least one source"
    for target in targets:
        assert f'id="{target}"' in sources


def test_answer_shows_provenance(answered, short_assistant):
    bubble = answered[-1][0][-1]["content"]
    assert "Base model: SmolLM2-135M-Instruct" in bubble
    assert "Adapter: none (base model)" in bubble
    assert f"Index: {short_assistant.index_version}" in bubble


def test_sources_panel_lists_citation_details(answered):
    sources = answered[-1][2]
    for label in ("Issuer", "Version", "Date", "Page/section", "Support"):
        assert f"<dt>{label}</dt>" in sources
    assert "Primary Hypothyroidism" in sources
    assert '<blockquote class="chunk">' in sources


# history and session isolation

def test_history_comes_from_same_session(answered, short_assistant):
    recorder = RecordingAssistant(short_assistant)
    session = copy.deepcopy(answered[-1][1])
    list(handlers.respond(recorder, OFF_CORPUS, "auto", session, "alice"))
    history = recorder.calls[-1]["history"]
    assert history[0] == {"role": "user", "content": IN_CORPUS}
    assert history[1]["role"] == "assistant"
    assert "[" not in history[1]["content"], "markers of an old answer must not reach the new prompt"


def test_fresh_session_sends_no_history(short_assistant):
    recorder = RecordingAssistant(short_assistant)
    list(handlers.respond(recorder, OFF_CORPUS, "auto", handlers.new_session(), "bob"))
    assert recorder.calls[-1]["history"] == []
    assert recorder.calls[-1]["user"] == "bob"


def test_new_sessions_share_nothing():
    first, second = handlers.new_session(), handlers.new_session()
    first["turns"].append({"question": "x"})
    assert second["turns"] == []


def test_session_of_other_user_is_replaced(answered):
    session = copy.deepcopy(answered[-1][1])
    claimed = handlers.claim_session(session, "mallory")
    assert claimed["user"] == "mallory"
    assert claimed["turns"] == []


def test_specialty_passed_to_pipeline(short_assistant):
    recorder = RecordingAssistant(short_assistant)
    list(handlers.respond(recorder, OFF_CORPUS, "cardiology", handlers.new_session(), "bob"))
    list(handlers.respond(recorder, OFF_CORPUS, "auto", handlers.new_session(), "bob"))
    assert recorder.calls[0]["specialty"] == "cardiology"
    assert recorder.calls[1]["specialty"] is None


def test_clear_session_forgets_turns(answered):
    cleared = handlers.clear_session(copy.deepcopy(answered[-1][1]), "alice")
    assert cleared == {"user": "alice", "turns": []}


# abstention and failures

def test_off_corpus_question_abstains(short_assistant):
    replies = list(handlers.respond(short_assistant, OFF_CORPUS, "auto", handlers.new_session(), "bob"))
    messages, session, sources = replies[-1]
    assert "bedside-abstention" in messages[-1]["content"]
    assert "abstained" in messages[-1]["content"]
    assert session["turns"][0]["abstained"] is True
    assert "bedside abstained" in sources


def test_invalid_question_shows_error_and_keeps_session(answered, short_assistant):
    session = copy.deepcopy(answered[-1][1])
    replies = list(handlers.respond(short_assistant, "x" * 5000, "auto", session, "alice"))
    messages, session, _ = replies[-1]
    assert "The request failed" in messages[-1]["content"]
    assert "4,000" in messages[-1]["content"]
    assert len(session["turns"]) == 2
    assert messages[0]["content"] == handlers.escape(IN_CORPUS)
    # the session still answers afterwards
    messages, session, _ = list(handlers.respond(short_assistant, OFF_CORPUS, "auto", session, "alice"))[-1]
    assert "bedside-abstention" in messages[-1]["content"]
    assert len(session["turns"]) == 3


def test_internal_failure_shows_error(demo_index_dir, embedder, embedder_info, demo_assistant):
    from assistant.answer.pipeline import Assistant
    from assistant.indexing import IndexStore
    from assistant.retrieval import Retriever

    index = IndexStore(demo_index_dir).open(embedder_info)
    index.close()  # searching a closed chunk database fails inside the pipeline
    broken = Assistant(demo_assistant.settings, Retriever(index, embedder), demo_assistant.generator)
    replies = list(handlers.respond(broken, IN_CORPUS, "auto", handlers.new_session(), "bob"))
    messages, session, _ = replies[-1]
    assert "The request failed" in messages[-1]["content"]
    assert "internal error" in messages[-1]["content"]
    assert session["turns"][0]["error"] is True
    assert handlers.prompt_history(session) == []


def test_empty_question_changes_nothing(answered, short_assistant):
    session = copy.deepcopy(answered[-1][1])
    replies = list(handlers.respond(short_assistant, "   ", "auto", session, "alice"))
    assert len(replies) == 1
    assert len(replies[0][1]["turns"]) == 1


# rendering of flags and escaping

def test_unsupported_sentence_is_flagged():
    sentences = [SentenceCheck("Give insulin. [1]", [1], 0.7, True),
                 SentenceCheck("Add magnesium daily.", [], 0.1, False)]
    flags = [{"type": "unsupported", "sentence": "Add magnesium daily.", "support": 0.1, "detail": "x"}]
    html = handlers.render_answer(make_answer("Give insulin. [1] Add magnesium daily.", sentences, flags,
                                              [make_citation(1)]), 3)
    assert '<mark class="unsupported"' in html
    assert "Add magnesium daily." in html
    assert "unsupported" in html
    assert 'href="#source-3-1"' in html


def test_removed_and_injected_citations_are_listed():
    flags = [{"type": "invalid_citation", "marker": 7, "detail": "x"},
             {"type": "injection", "marker": 2, "chunk_id": "c", "detail": "x"},
             {"type": "dropped_chunk", "chunk_id": "d", "detail": "x"},
             {"type": "auto_cited", "marker": 1, "sentence": "s", "detail": "x"}]
    sentences = [SentenceCheck("Give insulin. [1]", [1], 0.7, True, auto_cited=True)]
    html = handlers.render_answer(make_answer("Give insulin. [1]", sentences, flags, [make_citation(1)]), 1)
    assert "Removed citation [7]" in html
    assert "Source [2] contains an instruction" in html
    assert "left out to fit" in html
    assert "attached automatically" in html
    assert 'class="cite auto"' in html


def test_unsourced_figures_and_new_flags_listed():
    flags = [{"type": "number_not_in_source", "sentence": "Give 1.0 units", "numbers": [1.0, 250.5],
              "detail": "x"},
             {"type": "some_future_check", "detail": "a check the UI does not know yet"}]
    html = handlers.render_answer(make_answer("Give 1.0 units.", [], flags, []), 1)
    assert "The figure(s) 1, 250.5 appear in no cited source" in html
    assert "a check the UI does not know yet" in html


def test_model_and_corpus_text_is_escaped():
    hostile = 'See <img src=x onerror="alert(1)"> and ![x](http://example.invalid/p.png) [1]'
    answer = make_answer(hostile, [SentenceCheck(hostile, [1], 0.6, True)], [],
                         [make_citation(1, text="<script>alert(2)</script> Give insulin.")])
    bubble = handlers.render_answer(answer, 1)
    sources = handlers.render_turn_sources(answer, 1)
    assert "<img" not in bubble
    assert "&lt;img" in bubble
    assert "<script>" not in sources
    assert "<b>" not in sources
    assert "&lt;script&gt;" in sources


def test_streaming_text_is_escaped():
    assert "<b>" not in handlers.render_streaming("<b>dose</b>\n\nnext")
    assert "<br><br>" in handlers.render_streaming("a\n\nb")


def test_adapter_name_and_version_shown():
    answer = make_answer("x", [], [], [], adapter={"name": "cardiology", "version": "v3", "sha256": "ab" * 8})
    assert "Adapter: cardiology v3" in handlers.render_meta(answer)
    answer = make_answer("x", [], [], [], adapter={"name": "cardiology", "sha256": "ab" * 32})
    assert "Adapter: cardiology sha256 abababababab" in handlers.render_meta(answer)


def test_cited_passage_is_marked():
    chunk = "Start a fixed-rate infusion of 0.1 units/kg/hour. Check capillary ketones every hour."
    html = handlers.render_chunk(chunk, ["The infusion rate is 0.1 units/kg/hour [1]"])
    assert '<mark class="cited-passage">Start a fixed-rate infusion of 0.1 units/kg/hour.</mark>' in html
    assert "Check capillary ketones every hour." in html


def test_abstention_rendered_as_such():
    flags = [{"type": "abstained", "detail": "best chunk similarity 0.11 is below the relevance gate 0.40"}]
    html = handlers.render_answer(make_answer("not covered", [], flags, [], abstained=True), 1)
    assert "No answer: bedside abstained." in html
    assert "relevance gate" in html


# feedback

def test_feedback_stored_with_comment(answered, short_assistant):
    session = answered[-1][1]
    audit = short_assistant.audit
    status = handlers.record_feedback(audit, session, 1, "unsafe", "dose looks wrong", "alice")
    assert status.startswith("Recorded")
    row = next(r for r in short_assistant.audit.rows() if r["id"] == session["turns"][0]["audit_id"])
    assert row["feedback"] == "unsafe"
    assert row["feedback_comment"] == "dose looks wrong"
    assert row["feedback_at"]


@pytest.mark.parametrize(("turn", "kind", "comment", "expected"), [
    (1, "great", "", "invalid"),
    (9, "helpful", "", "not one of this session"),
    ("x", "helpful", "", "invalid"),
    (1, "helpful", "c" * 3000, "shorten it"),
])
def test_feedback_rejects_bad_input(answered, short_assistant, turn, kind, comment, expected):
    status = handlers.record_feedback(short_assistant.audit, answered[-1][1], turn, kind, comment, "alice")
    assert expected in status


def test_feedback_needs_an_answer(short_assistant):
    session = handlers.new_session()
    status = handlers.record_feedback(short_assistant.audit, session, None, "helpful", "", "bob")
    assert "Ask a question first" in status


def test_feedback_choices_newest_first(answered):
    session = copy.deepcopy(answered[-1][1])
    session["turns"].append({**session["turns"][0], "number": 2, "question": "second"})
    assert [n for _, n in handlers.feedback_choices(session)] == [2, 1]


def test_specialty_choices_start_with_auto(short_assistant):
    values = [value for _, value in handlers.specialty_choices(short_assistant)]
    assert values[0] == "auto"
    assert "cardiology" in values


# the page and its launch checks

def test_build_app_queues_one_request_at_a_time(short_assistant):
    from assistant.ui.app import build_app

    app = build_app(short_assistant)
    assert app._queue.default_concurrency_limit == 1


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.2", True),
    ("0.0.0.0", False), ("192.168.1.5", False), ("example.org", False),
])
def test_is_loopback(host, loopback):
    assert load_launch_module().is_loopback(host) is loopback


def test_launch_refuses_public_host_without_users(tmp_path):
    users = tmp_path / "users.json"
    command = [sys.executable, str(REPO / "launch.py"), "--host", "0.0.0.0", "--users-file", str(users),
               "--audit-db", str(tmp_path / "a.db")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 1
    assert "refusing to listen on '0.0.0.0' without a users file" in result.stderr
    assert not users.exists()


def test_launch_flags_reach_settings(tmp_path):
    launch = load_launch_module()
    args = launch.build_parser().parse_args(["--no-store-text", "--users-file", str(tmp_path / "u.json"),
                                             "--audit-db", str(tmp_path / "a.db"), "--max-new-tokens", "32"])
    settings = launch.resolve_settings(args)
    assert settings.store_text is False
    assert settings.users_file == tmp_path / "u.json"
    assert settings.audit_db == tmp_path / "a.db"
    assert settings.max_new_tokens == 32
    assert args.host == "127.0.0.1"
    assert launch.resolve_settings(launch.build_parser().parse_args([])).store_text is True


def test_launch_rejects_bad_port():
    launch = load_launch_module()
    with pytest.raises(BedsideError, match="port 70000 is invalid"):
        launch.resolve_settings(launch.build_parser().parse_args(["--port", "70000"]))


def test_first_account_created_on_loopback(tmp_path):
    store = UserStore(tmp_path / "users.json")
    created = load_launch_module().prepare_accounts(store, "127.0.0.1")
    assert created is not None
    name, password = created
    assert store.verify(name, password)
    assert load_launch_module().prepare_accounts(store, "0.0.0.0") is None


def test_empty_users_file_rejected(tmp_path):
    path = tmp_path / "users.json"
    path.write_text(json.dumps({"format": 1, "users": {}}))
    with pytest.raises(BedsideError, match="has no accounts"):
        load_launch_module().prepare_accounts(UserStore(path), "127.0.0.1")


# login accounts

def test_password_verifies_only_when_right(tmp_path):
    store = UserStore(tmp_path / "users.json")
    store.set_password("alice", "correct horse")
    assert store.verify("alice", "correct horse")
    assert not store.verify("alice", "correct horsE")
    assert not store.verify("nobody", "correct horse")
    assert not store.verify("alice", "")


def test_users_file_holds_salted_hashes_only(tmp_path):
    path = tmp_path / "users.json"
    store = UserStore(path)
    store.set_password("alice", "same password")
    store.set_password("bob", "same password")
    text = path.read_text()
    assert "same password" not in text
    users = json.loads(text)["users"]
    assert users["alice"]["salt"] != users["bob"]["salt"]
    assert users["alice"]["hash"] != users["bob"]["hash"]
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def test_users_file_reloaded_after_change(tmp_path):
    path = tmp_path / "users.json"
    server_side = UserStore(path)
    server_side.set_password("alice", "first password")
    assert not server_side.verify("bob", "second password")
    UserStore(path).set_password("bob", "second password")
    assert server_side.verify("bob", "second password")


def test_existing_user_needs_replace(tmp_path):
    store = UserStore(tmp_path / "users.json")
    store.set_password("alice", "first password")
    with pytest.raises(BedsideError, match="already exists"):
        store.set_password("alice", "other password")
    store.set_password("alice", "other password", replace=True)
    assert store.verify("alice", "other password")


@pytest.mark.parametrize(("name", "password", "message"), [
    ("", "long enough", "user name"),
    ("bad name", "long enough", "user name"),
    ("-x", "long enough", "user name"),
    ("alice", "short", "at least 8"),
])
def test_bad_account_input_rejected(tmp_path, name, password, message):
    with pytest.raises(BedsideError, match=message):
        UserStore(tmp_path / "users.json").set_password(name, password)


def test_malformed_users_file(tmp_path):
    path = tmp_path / "users.json"
    path.write_text("{not json")
    store = UserStore(path)
    assert not store.verify("alice", "whatever pw")
    with pytest.raises(BedsideError, match="cannot be read"):
        store.set_password("alice", "long enough")


def test_first_account_only_once(tmp_path):
    store = UserStore(tmp_path / "users.json")
    assert create_first_account(store) is not None
    assert create_first_account(store) is None
    assert store.names() == ["admin"]


def test_users_cli_add_from_stdin(tmp_path):
    path = tmp_path / "users.json"
    command = [sys.executable, "-m", "assistant.cli", "users", "add", "carol", "--password-stdin",
               "--users-file", str(path)]
    result = subprocess.run(command, input="carol's password\n", cwd=tmp_path, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert UserStore(path).verify("carol", "carol's password")


def bedside(monkeypatch, *args: str, stdin: str = "") -> int:
    from assistant.cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main(list(args))


def test_users_cli_duplicate_list_remove(tmp_path, monkeypatch, capsys):
    path = str(tmp_path / "users.json")
    assert bedside(monkeypatch, "users", "add", "carol", "--password-stdin", "--users-file", path,
                   stdin="first password\n") == 0
    assert bedside(monkeypatch, "users", "add", "carol", "--password-stdin", "--users-file", path,
                   stdin="second password\n") == 1
    assert "already exists" in capsys.readouterr().err
    assert bedside(monkeypatch, "users", "add", "carol", "--password-stdin", "--replace",
                   "--users-file", path, stdin="second password\n") == 0
    assert UserStore(tmp_path / "users.json").verify("carol", "second password")
    capsys.readouterr()
    assert bedside(monkeypatch, "users", "list", "--users-file", path) == 0
    assert capsys.readouterr().out.split() == ["carol"]
    assert bedside(monkeypatch, "users", "remove", "carol", "--users-file", path) == 0
    assert UserStore(tmp_path / "users.json").names() == []


def test_users_cli_without_terminal_needs_stdin_flag(tmp_path, monkeypatch, capsys):
    assert bedside(monkeypatch, "users", "add", "dave", "--users-file", str(tmp_path / "users.json")) == 1
    assert "--password-stdin" in capsys.readouterr().err
