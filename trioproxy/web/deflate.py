"""``permessage-deflate`` (RFC 7692) for the server's WebSockets, with inflation bounded.

Why: wsproto's extension inflates whatever a frame's compressed bytes expand to in one
call. Zeros compress about a thousandfold, so a message of 1 MB on the wire becomes a
gigabyte in memory before anyone can compare it with a size limit.

Theory of operation: :class:`BoundedDeflate` inflates a frame's data in steps of at most
``STEP`` bytes (``zlib`` ``max_length``, the rest of the input kept in ``unconsumed_tail``)
and never past ``room``, the bytes the message being received may still grow by, which its
owner (``web/websocket.py``) sets before each frame from the message size limit and the
server's request-memory budget. Output that would pass ``room`` fails the frame with the
close reason its owner chose (1009 message too big, 1013 try again later) and is never made.
"""

from __future__ import annotations

import zlib
from typing import Any

from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason

STEP = 64 * 1024
_TAIL = b"\x00\x00\xff\xff"  # the end of a message's compressed data (RFC 7692 7.2.2)


class BoundedDeflate(PerMessageDeflate):
    """``permessage-deflate`` that inflates at most ``room`` bytes (module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.room = 0
        self.over = CloseReason.MESSAGE_TOO_BIG

    def limit(self, room: int, over: CloseReason) -> None:
        """The bytes the message may still grow by, and the close when it would pass them."""
        self.room = max(room, 0)
        self.over = over

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        decompressor = self._decompressor
        assert decompressor is not None
        out: list[bytes] = []
        try:
            while True:
                want = min(STEP, self.room + 1)
                piece = decompressor.decompress(data, want)
                if len(piece) > self.room:
                    return self.over
                self.room -= len(piece)
                out.append(piece)
                data = decompressor.unconsumed_tail
                if not data and len(piece) < want:
                    break  # all input used, and no output left waiting in zlib
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        return out[0] if len(out) == 1 else b"".join(out)

    def frame_inbound_payload_data(self, proto: Any, data: bytes) -> bytes | CloseReason:
        if not self._inbound_compressed or not self._inbound_is_compressible:
            return data
        return self._inflate(bytes(data))

    def frame_inbound_complete(self, proto: Any, fin: bool) -> bytes | CloseReason | None:
        if not fin:
            return None
        if not self._inbound_is_compressible or not self._inbound_compressed:
            self._inbound_compressed = None
            return None
        data = self._inflate(_TAIL)
        no_context_takeover = (
            self.server_no_context_takeover if proto.client else self.client_no_context_takeover
        )
        if no_context_takeover:
            self._decompressor = None
        self._inbound_compressed = None
        return data
