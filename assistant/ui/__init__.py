"""The clinician web UI: plain handlers, the Gradio page built from them, and login accounts."""
