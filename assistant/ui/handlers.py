"""Gradio event handlers as plain functions, so they run and are tested without a browser.

A session is a plain dict created per browser tab by `new_session` (Gradio calls it through
`gr.State`), so nothing made at import time is shared between clinicians. Every piece of text
from the model or the corpus is HTML-escaped before it reaches the page. Markers become links to
`#source-<turn>-<n>`, and the page script resolves each link to exactly that source in the sources
panel.
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Iterator
from typing import Any

from assistant.answer.citations import MARKER
from assistant.answer.pipeline import MIN_SUPPORT
from assistant.errors import BedsideError

logger = logging.getLogger(__name__)

AUTO_SPECIALTY = "auto"
DISCLAIMER = (
    "Answers are decision support to be verified, not orders. Check each statement against its cited "
    "source before acting on it."
)
# Earlier turns sent with a new question: few and short, because the pipeline fits its token budget to
# the retrieved sources and the question, not to the history.
MAX_HISTORY_TURNS = 3
MAX_HISTORY_CHARS = 600
MAX_COMMENT_CHARS = 2000
FEEDBACK_LABELS = {"helpful": "Helpful", "wrong": "Wrong", "unsafe": "Unsafe"}
# flag types rendered by other parts of the answer: the sentence highlight, the marker style, the
# abstention box
SHOWN_ELSEWHERE = {"unsupported", "auto_cited", "abstained"}

# A chunk sentence runs to a . ! or ? followed by white space (so "0.1" stays whole) or to the line end.
CHUNK_SENTENCE = re.compile(r"\S[^\n]*?(?:[.!?](?=\s|$)|$)", re.MULTILINE)

Messages = list[dict[str, str]]
Reply = tuple[Messages, dict[str, Any], str | None]


# session state

def new_session() -> dict[str, Any]:
    """Return the empty state of one browser session: its owner and its turns."""
    return {"user": None, "turns": []}


def claim_session(session: dict[str, Any] | None, user: str) -> dict[str, Any]:
    """Return `session` owned by `user`, or a fresh one when it is missing or belongs to someone else.

    Gradio looks state up by a session id that the browser sends. Binding the state to the login name
    stops a request that carries another clinician's session id from reading or extending their turns.
    """
    if session is None or not isinstance(session.get("turns"), list):
        session = new_session()
    if session["user"] is None:
        session["user"] = user
    elif session["user"] != user:
        logger.warning("session of user %r used by user %r; starting an empty session", session["user"], user)
        session = new_session()
        session["user"] = user
    return session


def clear_session(session: dict[str, Any] | None, user: str) -> dict[str, Any]:
    """Return an empty session for `user`, because the chat's clear button also clears the prompt history."""
    fresh = new_session()
    fresh["user"] = user
    return fresh


def chat_messages(session: dict[str, Any]) -> Messages:
    """Return the Chatbot value (messages format) for every turn of the session."""
    messages: Messages = []
    for turn in session["turns"]:
        messages.append({"role": "user", "content": escape(turn["question"])})
        messages.append({"role": "assistant", "content": turn["html"]})
    return messages


def prompt_history(session: dict[str, Any]) -> Messages:
    """Return this session's earlier answered turns as chat messages for the model.

    Markers are stripped because [n] in an old answer named that turn's sources, not the new ones.
    Abstentions and failed requests are left out: they hold no guideline content.
    """
    history: Messages = []
    answered = [t for t in session["turns"] if not t["abstained"] and not t["error"]]
    for turn in answered[-MAX_HISTORY_TURNS:]:
        answer = re.sub(r"\s+", " ", MARKER.sub("", turn["answer"])).strip()
        history.append({"role": "user", "content": turn["question"][:MAX_HISTORY_CHARS]})
        history.append({"role": "assistant", "content": answer[:MAX_HISTORY_CHARS]})
    return history


def specialty_choices(assistant: Any) -> list[tuple[str, str]]:
    """Return (label, value) pairs: automatic routing first, then each specialty in the index."""
    names = assistant.retriever.index.specialties()
    return [("Auto-route", AUTO_SPECIALTY)] + [(name.replace("_", " ").capitalize(), name) for name in names]


def feedback_choices(session: dict[str, Any]) -> list[tuple[str, int]]:
    """Return (label, turn number) for each recorded answer of the session, newest first."""
    choices = []
    for turn in reversed(session["turns"]):
        if turn["audit_id"] is not None:
            question = turn["question"] if len(turn["question"]) <= 60 else turn["question"][:57] + "..."
            choices.append((f"Answer {turn['number']}: {question}", turn["number"]))
    return choices


# asking

def respond(assistant: Any, question: str, specialty: str | None, session: dict[str, Any] | None,
            user: str) -> Iterator[Reply]:
    """Answer one question, yielding (chat messages, session, sources panel HTML) as the answer grows.

    Tokens stream into a bubble marked as not yet verified; the verified answer then replaces it.
    The sources HTML is None while tokens stream, because the panel only changes with the final answer.
    A failure becomes an error bubble in the chat and the session stays usable.
    """
    session = claim_session(session, user)
    question = (question or "").strip()
    if not question:
        yield chat_messages(session), session, render_sources(session)
        return

    number = len(session["turns"]) + 1
    earlier = chat_messages(session)
    question_message = {"role": "user", "content": escape(question)}
    history = prompt_history(session)
    chosen = None if specialty in (None, "", AUTO_SPECIALTY) else specialty
    bubble = {"role": "assistant", "content": render_streaming("")}
    yield earlier + [question_message, bubble], session, render_sources(session)

    # stream, then swap in the verified answer
    streamed = ""
    try:
        answer = None
        for event in assistant.ask_stream(question, specialty=chosen, user=user, history=history):
            if event.kind == "token":
                streamed += event.text
                bubble = {"role": "assistant", "content": render_streaming(streamed)}
                yield earlier + [question_message, bubble], session, None
            elif event.kind == "answer":
                answer = event.answer
        if answer is None:
            raise RuntimeError("the answer pipeline ended without an answer")
    except BedsideError as err:
        logger.warning("request of user %r failed: %s", user, err)
        session["turns"].append(error_turn(number, question, str(err)))
    except Exception as err:  # the chat must survive any failure; the details go to the server log
        logger.exception("request of user %r failed", user)
        session["turns"].append(error_turn(number, question, f"internal error ({type(err).__name__}); "
                                                             "the details are in the server log"))
    else:
        session["turns"].append(answer_turn(number, question, answer))
    yield chat_messages(session), session, render_sources(session)


def answer_turn(number: int, question: str, answer: Any) -> dict[str, Any]:
    """Return the session record of an answered turn, with its chat bubble and sources pre-rendered."""
    return {
        "number": number,
        "question": question,
        "answer": answer.answer,
        "abstained": bool(answer.abstained),
        "error": False,
        "audit_id": getattr(answer, "audit_id", None),
        "html": render_answer(answer, number),
        "sources_html": render_turn_sources(answer, number),
    }


def error_turn(number: int, question: str, message: str) -> dict[str, Any]:
    return {
        "number": number,
        "question": question,
        "answer": "",
        "abstained": False,
        "error": True,
        "audit_id": None,
        "html": f'<div class="bedside-error"><strong>The request failed:</strong> {escape(message)}. '
                "Your earlier answers are kept; ask again or rephrase.</div>",
        "sources_html": "",
    }


# feedback

def record_feedback(audit: Any, session: dict[str, Any] | None, turn_number: Any, kind: str, comment: str,
                    user: str) -> str:
    """Store helpful/wrong/unsafe feedback (and an optional comment) on one answer of this session.

    Returns the status line to show under the buttons.
    """
    session = claim_session(session, user)
    if kind not in FEEDBACK_LABELS:
        return f"Feedback {kind!r} is invalid; use one of {', '.join(FEEDBACK_LABELS)}."
    if audit is None:
        return "Feedback cannot be stored: this server runs without an audit log."
    turns = {t["number"]: t for t in session["turns"] if t["audit_id"] is not None}
    if not turns:
        return "Ask a question first; feedback is attached to an answer."
    try:
        number = int(turn_number) if turn_number not in (None, "") else max(turns)
    except (TypeError, ValueError):
        return f"Answer {turn_number!r} is invalid; choose one from the list."
    if number not in turns:
        return f"Answer {number} is not one of this session's recorded answers; choose one from the list."
    comment = (comment or "").strip()
    if len(comment) > MAX_COMMENT_CHARS:
        return f"The comment has {len(comment):,} characters; shorten it to {MAX_COMMENT_CHARS:,} or fewer."
    try:
        audit.add_feedback(turns[number]["audit_id"], kind, comment)
    except BedsideError as err:
        logger.warning("feedback of user %r not stored: %s", user, err)
        return f"Feedback not stored: {err}."
    logger.info("user %r marked audit record %s as %s", user, turns[number]["audit_id"], kind)
    return f"Recorded **{FEEDBACK_LABELS[kind].lower()}** for answer {number}" + \
        (" with your comment." if comment else ".")


# rendering

def escape(text: str) -> str:
    """HTML-escape text and keep its line breaks.

    Line breaks become <br> because a blank line inside an HTML block would end the block and hand
    the rest to the Markdown renderer.
    """
    return html.escape(text or "", quote=True).replace("\r\n", "\n").replace("\n", "<br>")


def marker_link(turn: int, marker: int, auto: bool = False) -> str:
    title = f"Show source {marker}"
    if auto:
        title += " (attached automatically: the model cited nothing here)"
    css = "cite auto" if auto else "cite"
    return f'<a class="{css}" href="#source-{turn}-{marker}" title="{title}">[{marker}]</a>'


def link_markers(escaped: str, turn: int, auto: set[int] | None = None) -> str:
    """Turn each [n] of already-escaped text into a link to source n of this turn."""
    auto = auto or set()
    return MARKER.sub(lambda m: marker_link(turn, int(m.group(1)), int(m.group(1)) in auto), escaped)


def render_streaming(text: str) -> str:
    return ('<div class="bedside-streaming"><div class="stream-label">Generating, not yet verified'
            f'</div><div class="stream-text">{escape(text)}</div></div>')


def render_meta(answer: Any) -> str:
    """Return the line naming what produced the answer: base model, adapter and version, index version."""
    adapter = answer.adapter or {}
    if adapter.get("name"):
        version = adapter.get("version") or ""
        if not version and adapter.get("sha256"):
            version = f"sha256 {adapter['sha256'][:12]}"
        adapter_text = f"{adapter['name']} {version}".strip()
    else:
        adapter_text = "none (base model)"
    parts = [f"Base model: {answer.model}", f"Adapter: {adapter_text}", f"Index: {answer.index_version}"]
    audit_id = getattr(answer, "audit_id", None)
    if audit_id is not None:
        parts.append(f"Audit record {audit_id}")
    return '<div class="answer-meta">' + " · ".join(escape(p) for p in parts) + "</div>"


def render_flags(answer: Any) -> str:
    """Return the list of warnings about removed citations, injected sources and dropped chunks."""
    items = []
    unsupported = [f for f in answer.flags if f.get("type") == "unsupported"]
    if unsupported:
        items.append(("warn", f"{len(unsupported)} sentence(s) have no supporting source (highlighted); "
                              "verify them before use."))
    injected_sources: set[Any] = set()
    for flag in answer.flags:
        kind = flag.get("type")
        if kind in SHOWN_ELSEWHERE:
            continue
        if kind == "injection":
            # one source may match several patterns; the clinician needs one warning per source
            if flag.get("marker") in injected_sources:
                continue
            injected_sources.add(flag.get("marker"))
        if kind == "number_not_in_source":
            shown = ", ".join(f"{value:g}" for value in flag.get("numbers", []))
            items.append(("warn", f"The figure(s) {shown} appear in no cited source; check every figure "
                                  "against the source."))
        elif kind == "invalid_citation":
            items.append(("warn", f"Removed citation [{flag.get('marker')}]: it named no source given to the "
                                  "model."))
        elif kind == "injection":
            items.append(("warn", f"Source [{flag.get('marker')}] contains an instruction aimed at the "
                                  "model; it was removed from the prompt and the source used as data only."))
        elif kind == "dropped_chunk":
            items.append(("info", "A lower-ranked source was left out to fit the model's context."))
        else:
            # a flag type added to the pipeline later still reaches the clinician
            items.append(("warn", str(flag.get("detail") or kind)))
    auto = sorted({f.get("marker") for f in answer.flags if f.get("type") == "auto_cited"})
    if auto:
        items.append(("info", "Citation(s) " + ", ".join(f"[{m}]" for m in auto) + " were attached "
                      "automatically to sentences the model left uncited."))
    if not items:
        return ""
    rows = "".join(f'<li class="flag-{level}"><strong>{"Warning" if level == "warn" else "Note"}:</strong> '
                   f"{escape(text)}</li>" for level, text in items)
    return f'<ul class="answer-flags">{rows}</ul>'


def render_answer(answer: Any, turn: int) -> str:
    """Return the verified answer as HTML: linked markers, flagged sentences, warnings and provenance."""
    if answer.abstained:
        reason = next((f.get("detail", "") for f in answer.flags if f.get("type") == "abstained"), "")
        body = ('<div class="bedside-abstention"><strong>No answer: bedside abstained.</strong> '
                f'{escape(answer.answer)}' + (f'<div class="reason">{escape(reason)}</div>' if reason else "")
                + "</div>")
        return f'<div class="bedside-answer">{body}{render_meta(answer)}</div>'

    if answer.sentences:
        parts = []
        for sentence in answer.sentences:
            auto = set(sentence.markers) if sentence.auto_cited else set()
            text = link_markers(escape(sentence.text), turn, auto)
            if not sentence.supported:
                text = (f'<mark class="unsupported" title="Not verified against a cited source (best '
                        f'similarity {sentence.support:.2f}); verify it before use">{text}</mark>'
                        '<span class="unsupported-tag"> ⚠ unsupported</span>')
            parts.append(text)
        body = " ".join(parts)
    else:
        body = link_markers(escape(answer.answer), turn)
    return (f'<div class="bedside-answer"><div class="answer-text">{body}</div>{render_flags(answer)}'
            f'{render_meta(answer)}</div>')


def cited_passages(chunk_text: str, sentences: list[str]) -> list[tuple[int, int]]:
    """Return (start, end) spans of the chunk sentences sharing the most words with each citing sentence."""
    spans = [m.span() for m in CHUNK_SENTENCE.finditer(chunk_text)]
    chosen: set[tuple[int, int]] = set()
    for sentence in sentences:
        words = _content_words(MARKER.sub("", sentence))
        scored = [(len(words & _content_words(chunk_text[a:b])), (a, b)) for a, b in spans]
        best = max(scored, default=(0, None))
        if best[0] >= 2:
            chosen.add(best[1])
    return sorted(chosen)


def _content_words(text: str) -> set[str]:
    # words of three or more characters, plus numbers of any length: doses and scores matter most
    return {w for w in re.findall(r"[a-z0-9]+", text.lower()) if len(w) >= 3 or w.isdigit()}


def render_chunk(chunk_text: str, sentences: list[str]) -> str:
    """Return the escaped chunk text with the passages the answer rests on wrapped in <mark>."""
    out, position = [], 0
    for start, end in cited_passages(chunk_text, sentences):
        out.append(escape(chunk_text[position:start]))
        out.append(f'<mark class="cited-passage">{escape(chunk_text[start:end])}</mark>')
        position = end
    out.append(escape(chunk_text[position:]))
    return "".join(out)


def render_turn_sources(answer: Any, turn: int) -> str:
    """Return one panel section listing each citation of the answer, in marker order."""
    heading = f'<h3>Sources for answer {turn}</h3><p class="turn-question">{escape(answer.question)}</p>'
    if answer.abstained:
        reason = next((f.get("detail", "") for f in answer.flags if f.get("type") == "abstained"), "")
        shown = escape(reason or "no reason given")
        return heading + f'<p class="no-sources">No sources: bedside abstained ({shown}).</p>'
    if not answer.citations:
        return heading + '<p class="no-sources">No citations: no sentence of this answer rests on a ' \
                         "retrieved source. Treat the whole answer as unverified.</p>"
    citing: dict[int, list[str]] = {}
    for sentence in answer.sentences:
        for marker in sentence.markers:
            citing.setdefault(marker, []).append(sentence.text)
    items = []
    for citation in sorted(answer.citations, key=lambda c: c.marker):
        where = f"page {citation.page}" if citation.page else (citation.section or "not given")
        strength = "supported" if citation.support >= MIN_SUPPORT else "weak support"
        details = [("Issuer", citation.issuer or "not given"), ("Version", citation.version or "not given"),
                   ("Date", citation.date or "undated"), ("Page/section", where),
                   ("Support", f"{citation.support:.2f} ({strength})")]
        rows = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in details)
        items.append(
            f'<article class="source" id="source-{turn}-{citation.marker}" data-marker="{citation.marker}">'
            f'<header><span class="marker">[{citation.marker}]</span> <strong class="title">'
            f'{escape(citation.title)}</strong></header><dl>{rows}</dl>'
            f'<blockquote class="chunk">{render_chunk(citation.text, citing.get(citation.marker, []))}'
            f'</blockquote><p class="chunk-id">Chunk {escape(citation.chunk_id)}</p></article>'
        )
    return heading + "".join(items)


def render_sources(session: dict[str, Any]) -> str:
    """Return the sources panel of every answered turn; older turns stay hidden until a marker shows them."""
    turns = [t for t in session["turns"] if not t["error"]]
    if not turns:
        return ('<div class="bedside-sources" id="bedside-sources"><p class="no-sources">Sources of the '
                "answer appear here. Click a marker such as [1] in an answer to show that source.</p></div>")
    sections = []
    for turn in reversed(turns):
        current = " current" if turn is turns[-1] else ""
        number = turn["number"]
        sections.append(f'<section class="turn{current}" id="turn-{number}" data-turn="{number}">'
                        f'{turn["sources_html"]}</section>')
    toolbar = ('<div class="sources-toolbar"><button type="button" class="show-all-sources">'
               "Show all sources of this answer</button></div>")
    return f'<div class="bedside-sources" id="bedside-sources">{toolbar}{"".join(sections)}</div>'
