"""Downstream sessions: HTTP turns, WebSocket sessions (and, with issue 4, bridge sessions)."""
