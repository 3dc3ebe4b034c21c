"""How the mock cuts one turn's answer into socket writes (sans-IO: bytes and texts in, the
writes to make out; ``writers.py`` makes them).

Theory of operation: a network does not deliver an answer the way the server wrote it. TCP
coalesces small writes into one segment and cuts large ones anywhere; load balancers and
proxies re-chunk. A client or proxy that only works when every read holds exactly one SSE
event, or one WebSocket message in one frame, is broken, and a mock that writes one event per
``send_all`` never shows it. The mode says how the mock writes:

``event`` (default)
    one write per SSE event (HTTP chunk) or WebSocket message (one frame).
``whole``
    every write of a turn is held and goes out as one write when the turn ends: over HTTP the
    response head, every event and the end of the chunked body; over WebSocket every frame
    through the terminal event. A turn cut by a fault writes what it holds in one write, then
    cuts. Delays (``first_event_delay``, ``event_delay``) still run between events, so they
    only delay that one write.
``split``
    every SSE event is cut into several writes: inside the ``event:`` line, inside the
    ``data:`` JSON, between the two newlines that end the event, and sometimes at one more
    point anywhere in the chunk (its size line included). Every WebSocket message is sent as
    several fragments (a first frame and continuation frames), some writes are cut inside a
    frame, and runs of short messages are held and coalesced into the next write.

Cut points come from the ``random.Random`` the caller passes (the mock seeds it with its
``seed``), so a run is reproducible as far as the order of turns is.
"""

from __future__ import annotations

import itertools
import random

import attrs

MODES = ("event", "whole", "split")
SHORT_MESSAGE = 512  # WebSocket messages shorter than this may be coalesced (split mode)
MAX_COALESCED = 4  # at most this many short messages held for the next write


def check_mode(value: object) -> str:
    """``value`` if it names a mode; ``ValueError`` otherwise."""
    if value not in MODES:
        raise ValueError(f"segmentation must be one of {', '.join(MODES)}, not {value!r}")
    return str(value)


def cut(data: bytes, offsets: list[int]) -> list[bytes]:
    """``data`` cut at ``offsets`` (any order; offsets outside ``1..len-1`` are ignored)."""
    points = sorted({o for o in offsets if 0 < o < len(data)})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def sse_cuts(rng: random.Random, event: bytes) -> list[int]:
    """Offsets inside one encoded SSE event (``event: T\\ndata: JSON\\n\\n``) to cut it at:
    inside the ``event:`` line, inside the JSON, and between the two final newlines."""
    offsets = [len(event) - 1] if event.endswith(b"\n\n") else []
    line_end = event.find(b"\n")
    if event.startswith(b"event:") and line_end > 1:
        offsets.append(rng.randint(1, line_end - 1))
    data_at = event.find(b"data: ")
    if data_at >= 0:
        first, last = data_at + len(b"data: ") + 1, len(event) - 3
        if first <= last:
            offsets.append(rng.randint(first, last))
    return offsets


def text_cuts(rng: random.Random, text: str) -> list[str]:
    """``text`` in 2 to 4 non-empty pieces (fewer if it is shorter)."""
    if len(text) < 2:
        return [text]
    count = rng.randint(2, min(4, len(text)))
    points = sorted(rng.sample(range(1, len(text)), count - 1))
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@attrs.frozen
class Frame:
    """One WebSocket text frame: a piece of a message, the last one if ``finished``."""

    text: str
    finished: bool = True


@attrs.frozen
class WsWrite:
    """Frames that go out in one write; cut in two writes at ``split_at`` (a fraction of the
    encoded bytes) if given."""

    frames: tuple[Frame, ...]
    split_at: float | None = None


@attrs.define(eq=False)
class Segmenter:
    """The writes of one turn, decided as its parts are encoded.

    HTTP: ``head``, ``event`` and ``end`` take the bytes h11 encoded for the response head,
    one event's chunk (with the event's SSE text, to find the cut points in it) and the end of
    the body. WebSocket: ``message`` takes one message's text. Each returns the writes to make
    now; ``flush`` returns what is held (call it before a cut and when the turn ends)."""

    mode: str
    rng: random.Random
    held: bytearray = attrs.field(factory=bytearray)
    held_frames: list[Frame] = attrs.field(factory=list)
    held_messages: int = 0

    def __attrs_post_init__(self) -> None:
        check_mode(self.mode)

    # -- HTTP: bytes ----------------------------------------------------------------------
    def head(self, wire: bytes) -> list[bytes]:
        return self._hold(wire) if self.mode == "whole" else [wire]

    def event(self, wire: bytes, sse: bytes) -> list[bytes]:
        if self.mode == "whole":
            return self._hold(wire)
        if self.mode == "event" or not wire.endswith(sse + b"\r\n"):
            return [wire]
        at = len(wire) - len(sse) - 2  # the chunk size line comes first
        offsets = [at + offset for offset in sse_cuts(self.rng, sse)]
        if self.rng.random() < 0.5:
            offsets.append(self.rng.randint(1, len(wire) - 1))
        return cut(wire, offsets)

    def end(self, wire: bytes) -> list[bytes]:
        return [*self._hold(wire), *self.flush()] if self.mode == "whole" else [wire]

    def flush(self) -> list[bytes]:
        data, self.held = bytes(self.held), bytearray()
        return [data] if data else []

    def _hold(self, wire: bytes) -> list[bytes]:
        self.held += wire
        return []

    # -- WebSocket: texts -----------------------------------------------------------------
    def message(self, text: str) -> list[WsWrite]:
        if self.mode == "event":
            return [WsWrite((Frame(text),))]
        if self.mode == "whole":
            self.held_frames.append(Frame(text))
            return []
        pieces = text_cuts(self.rng, text)
        frames = [Frame(p, i == len(pieces) - 1) for i, p in enumerate(pieces)]
        if (
            len(text) < SHORT_MESSAGE
            and self.held_messages < MAX_COALESCED
            and self.rng.random() < 0.5
        ):
            self.held_frames += frames
            self.held_messages += 1
            return []
        first = [*self.held_frames, frames[0]]
        self.held_frames, self.held_messages = [], 0
        return [self._ws_write(first), *(self._ws_write([f]) for f in frames[1:])]

    def flush_frames(self) -> list[WsWrite]:
        frames, self.held_frames, self.held_messages = self.held_frames, [], 0
        if not frames:
            return []
        return [WsWrite(tuple(frames))] if self.mode == "whole" else [self._ws_write(frames)]

    def _ws_write(self, frames: list[Frame]) -> WsWrite:
        split_at = self.rng.uniform(0.1, 0.9) if self.rng.random() < 0.5 else None
        return WsWrite(tuple(frames), split_at)
