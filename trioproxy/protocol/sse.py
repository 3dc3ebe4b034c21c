"""Server-sent events, sans-IO: split an upstream byte stream into frames without copying more
than needed, and read just the fields the proxy acts on.

The proxy forwards upstream bytes as they arrive; the splitter only tells it where frame
boundaries are and what each frame's ``data`` JSON says (``type``, response id, usage,
errors). Both ``\\n\\n`` and ``\\r\\n\\r\\n`` separators are accepted.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

_SEPARATORS = (b"\n\n", b"\r\n\r\n")


@attrs.define(eq=False)
class SSEFrameSplitter:
    """Feed bytes, get complete frames (raw bytes, separator included).

    Only bytes not searched before are searched again (a multi-megabyte frame arriving in
    64 KiB chunks must not be rescanned from its start on every chunk)."""

    buffer: bytearray = attrs.field(factory=bytearray)
    max_frame: int = 64 * 1024 * 1024
    _scanned: int = 0

    def feed(self, data: bytes) -> list[bytes]:
        """The frames ``data`` completes (an incomplete one waits for the next bytes)."""
        frames: list[bytes] = []
        self.buffer += data
        while True:
            start = max(0, self._scanned - 3)
            cut, sep_len = -1, 0
            for sep in _SEPARATORS:
                index = self.buffer.find(sep, start)
                if index != -1 and (cut == -1 or index < cut):
                    cut, sep_len = index, len(sep)
            if cut == -1:
                self._scanned = len(self.buffer)
                if self._scanned > self.max_frame:
                    raise ValueError("SSE frame larger than the limit")
                return frames
            end = cut + sep_len
            frames.append(bytes(self.buffer[:end]))
            del self.buffer[:end]
            self._scanned = 0


def frame_data(frame: bytes) -> dict[str, Any] | None:
    """The JSON object in a frame's ``data:`` lines, or None (comments, keep-alives, junk)."""
    lines = frame.splitlines()
    data = [line[5:].lstrip(b" ") for line in lines if line.startswith(b"data:")]
    if not data:
        return None
    try:
        value = json.loads(b"\n".join(data))
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def encode_event(event: dict[str, Any]) -> bytes:
    """An SSE frame for ``event`` (``event:`` line + compact ``data:`` JSON)."""
    payload = json.dumps(event, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event.get('type', 'message')}\ndata: {payload}\n\n".encode()


# Sent while upstream is silent before its first event. An SSE comment would be the textbook
# keep-alive, but the Codex CLI's stream idle timer ignores comments (it timed out through
# them, verified with 0.169.0); an event it parses and ignores resets the timer.
KEEPALIVE_FRAME = b'event: keepalive\ndata: {"type":"keepalive"}\n\n'
