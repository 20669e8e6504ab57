"""Training recipes (LoRA, QLoRA, full), the adapter registry, adapter checks and the router."""
