"""roles layer of the daemon (docs/architecture.md)."""
