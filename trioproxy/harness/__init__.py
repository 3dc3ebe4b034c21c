"""The Trio harness: a protocol-faithful mock Codex backend and (later) a load generator."""
