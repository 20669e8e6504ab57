"""The clinician's page: chat with streamed, verified answers beside a sources panel.

`build_app` wires the plain handlers of `assistant.ui.handlers` to Gradio components; `launch_options`
holds what Gradio 6 takes at `launch()` time (theme, CSS, the page script). Requests queue one at a
time because one base model serves every user.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

# Gradio's usage analytics and version check would call out to the internet; answers may concern patients.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from assistant.ui import handlers  # noqa: E402

logger = logging.getLogger(__name__)

# Waiting requests beyond this get Gradio's "queue is full" error instead of waiting for minutes.
MAX_QUEUE = 64

CSS = """
#bedside-disclaimer { border-left: 4px solid #b45309; background: #fffbeb; padding: 6px 12px;
  color: #78350f; }
.bedside-answer .answer-text { line-height: 1.55; }
.bedside-answer a.cite { font-weight: 600; text-decoration: none; padding: 0 1px; }
.bedside-answer a.cite.auto { font-style: italic; }
.bedside-answer mark.unsupported { background: #fee2e2; color: inherit;
  text-decoration: underline wavy #dc2626; }
.bedside-answer .unsupported-tag { color: #b91c1c; font-size: 0.85em; font-weight: 600; }
.bedside-answer .answer-flags { margin: 8px 0 0 0; padding-left: 0; list-style: none; font-size: 0.9em; }
.bedside-answer .answer-flags .flag-warn { color: #b91c1c; }
.bedside-answer .answer-flags .flag-info { color: #1d4ed8; }
.bedside-answer .answer-meta { margin-top: 8px; font-size: 0.8em; opacity: 0.75; }
.bedside-abstention { border-left: 4px solid #6b7280; padding-left: 8px; }
.bedside-abstention .reason { font-size: 0.85em; opacity: 0.8; }
.bedside-streaming .stream-label { font-size: 0.8em; font-style: italic; opacity: 0.7; }
.bedside-error { color: #b91c1c; }
.bedside-sources .turn { display: none; }
.bedside-sources .turn.current { display: block; }
.bedside-sources.focused .source:not(.selected) { display: none; }
.bedside-sources:not(.focused) .show-all-sources { display: none; }
.bedside-sources .source { border: 1px solid #d1d5db; border-radius: 6px; padding: 8px 10px; margin: 8px 0; }
.bedside-sources .source.selected { border: 2px solid #2563eb; }
.bedside-sources .source dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 10px;
  margin: 6px 0; font-size: 0.85em; }
.bedside-sources .source dt { font-weight: 600; }
.bedside-sources .source dd { margin: 0; }
.bedside-sources blockquote.chunk { margin: 6px 0; padding: 6px 10px; border-left: 3px solid #9ca3af;
  font-size: 0.9em; white-space: normal; max-height: 320px; overflow-y: auto; }
.bedside-sources mark.cited-passage { background: #fef08a; color: inherit; }
.bedside-sources .chunk-id, .bedside-sources .turn-question { font-size: 0.8em; opacity: 0.75; }
"""

# Markers link to "#source-<turn>-<n>"; this listener shows exactly that source instead of navigating.
# It is registered once on the document, so panels re-rendered by later answers need no new wiring.
HEAD = """
<script>
(() => {
  function showSource(id) {
    const target = document.getElementById(id);
    if (!target) return;
    const panel = target.closest(".bedside-sources");
    panel.querySelectorAll(".turn").forEach((t) => t.classList.toggle("current", t.contains(target)));
    panel.querySelectorAll(".source").forEach((s) => s.classList.toggle("selected", s === target));
    panel.classList.add("focused");
    target.scrollIntoView({block: "nearest"});
  }
  document.addEventListener("click", (event) => {
    if (!(event.target instanceof Element)) return;
    const link = event.target.closest('a[href^="#source-"]');
    if (link) {
      event.preventDefault();
      event.stopPropagation();
      showSource(link.getAttribute("href").slice(1));
      return;
    }
    const button = event.target.closest(".show-all-sources");
    if (button) {
      const panel = button.closest(".bedside-sources");
      panel.classList.remove("focused");
      panel.querySelectorAll(".source.selected").forEach((s) => s.classList.remove("selected"));
    }
  }, true);
})();
</script>
"""


def cap_malloc_arenas(count: int = 2) -> bool:
    """Limit glibc to `count` malloc arenas for threads started from now on; return whether it applied.

    glibc gives each allocating thread its own arena (up to 8 per core) and keeps freed memory in
    it. Gradio answers requests on a pool of threads, so the server's memory grew by about 900 MiB
    more before levelling off without a cap (benchmarks/load.py on 2 cores; docs/benchmarks.md).
    A MALLOC_ARENA_MAX set by the user wins, and other C libraries are left alone.
    """
    import ctypes

    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_arena_max = -8  # from glibc's malloc.h
    return bool(mallopt(m_arena_max, count))


def launch_options() -> dict[str, Any]:
    """Return the keyword arguments Gradio 6 takes at launch for this page's look and script."""
    # System fonts only: the default theme would load its fonts from Google, and the page must work
    # on a network that reaches nothing but this server.
    theme = gr.themes.Default(font=["system-ui", "Segoe UI", "Roboto", "sans-serif"],
                              font_mono=["ui-monospace", "SFMono-Regular", "monospace"])
    return {"theme": theme, "css": CSS, "head": HEAD, "ssr_mode": False, "footer_links": ["settings"]}


def request_user(request: gr.Request | None) -> str:
    """Return the logged-in user name; "local" when the app runs without a login (tests, notebooks)."""
    return (getattr(request, "username", None) if request is not None else None) or "local"


def build_app(assistant: Any, audit: Any = None, title: str = "bedside") -> gr.Blocks:
    """Build the page around one loaded `Assistant`; feedback goes to `audit` (default: the assistant's)."""
    audit = audit if audit is not None else getattr(assistant, "audit", None)
    specialties = handlers.specialty_choices(assistant)

    def on_load(request: gr.Request) -> str:
        return (f'Signed in as <strong>{handlers.escape(request_user(request))}</strong> · '
                '<a href="logout" target="_self">Log out</a>')

    def on_ask(question: str, specialty: str, session: dict[str, Any],
               request: gr.Request) -> Iterator[tuple[Any, ...]]:
        user = request_user(request)
        first = True
        state = session
        for messages, state, sources in handlers.respond(assistant, question, specialty, session, user):
            # the question box clears at once; the feedback list changes only when the answer is final
            panel = gr.skip() if sources is None else sources
            yield messages, state, panel, ("" if first else gr.skip()), gr.skip()
            first = False
        choices = handlers.feedback_choices(state)
        yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), \
            gr.update(choices=choices, value=choices[0][1] if choices else None)

    def feedback_handler(kind: str) -> Callable[..., tuple[str, Any]]:
        def on_feedback(turn: Any, comment: str, session: dict[str, Any],
                        request: gr.Request) -> tuple[str, Any]:
            status = handlers.record_feedback(audit, session, turn, kind, comment, request_user(request))
            cleared = "" if status.startswith("Recorded") else gr.skip()
            return status, cleared

        return on_feedback

    with gr.Blocks(title=title, analytics_enabled=False) as app:
        session = gr.State(handlers.new_session)
        with gr.Row():
            gr.Markdown("## bedside: guideline answers with sources", elem_id="bedside-title")
            signed_in = gr.HTML("", elem_id="bedside-user")
        gr.Markdown(f"**{handlers.DISCLAIMER}**", elem_id="bedside-disclaimer")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Answers", elem_id="bedside-chat", height=560,
                                     feedback_options=None, latex_delimiters=[], sanitize_html=True,
                                     buttons=["copy"],
                                     placeholder="Ask a question about the indexed guidelines.")
                with gr.Row():
                    question = gr.Textbox(label="Question", placeholder="e.g. When should anticoagulation be "
                                          "offered in atrial fibrillation?", scale=4, max_lines=6,
                                          elem_id="bedside-question")
                    specialty = gr.Dropdown(specialties, value=handlers.AUTO_SPECIALTY, label="Specialty",
                                            scale=1, elem_id="bedside-specialty")
                ask = gr.Button("Ask", variant="primary", elem_id="bedside-ask")
                with gr.Accordion("Feedback on an answer", open=True, elem_id="bedside-feedback"):
                    target = gr.Dropdown([], label="Answer", elem_id="bedside-feedback-target")
                    comment = gr.Textbox(label="Comment (optional)", max_lines=4, elem_id="bedside-comment")
                    with gr.Row():
                        buttons = {kind: gr.Button(label, size="sm", elem_id=f"bedside-feedback-{kind}")
                                   for kind, label in handlers.FEEDBACK_LABELS.items()}
                    status = gr.Markdown("", elem_id="bedside-feedback-status")
            with gr.Column(scale=2):
                gr.Markdown("### Sources")
                sources = gr.HTML(handlers.render_sources(handlers.new_session()),
                                  elem_id="bedside-sources-panel")

        def on_clear(session: dict[str, Any], request: gr.Request) -> tuple[Any, ...]:
            fresh = handlers.clear_session(session, request_user(request))
            return fresh, handlers.render_sources(fresh), gr.update(choices=[], value=None), ""

        app.load(on_load, None, signed_in, queue=False)
        chatbot.clear(on_clear, [session], [session, sources, target, status], queue=False)
        ask_outputs = [chatbot, session, sources, question, target]
        question.submit(on_ask, [question, specialty, session], ask_outputs)
        ask.click(on_ask, [question, specialty, session], ask_outputs)
        for kind, button in buttons.items():
            # feedback is a short database write: it must not wait behind answers in the model's queue
            button.click(feedback_handler(kind), [target, comment, session], [status, comment],
                         concurrency_limit=None)

    app.queue(default_concurrency_limit=1, max_size=MAX_QUEUE)
    return app
