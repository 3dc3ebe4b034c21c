"""The Trio harness: a protocol-faithful mock Codex backend (``mock_upstream``) and a load
generator (``bench``)."""
