"""llmctl: the supervisorctl-style client."""
