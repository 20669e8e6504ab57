"""Privacy and safety: PHI scrubbing and prompt-injection detection. Nothing heavy is imported here."""
