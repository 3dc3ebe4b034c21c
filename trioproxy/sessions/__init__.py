"""The conversation core: conversations, the failover engine, the transport edge, delivery
to a client's sink, and the HTTP bridge (see docs/architecture.md)."""
