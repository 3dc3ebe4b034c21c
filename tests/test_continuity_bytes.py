"""``python -m trioproxy.harness.continuity_bytes --chat``, shortened: a Chat Completions
conversation sends less upstream with the bridge's continuations than without, for the
same client bytes, and a forced account switch goes whole once."""

from __future__ import annotations

from trioproxy.harness.continuity_bytes import measure, report


async def test_chat_continuations_send_less_upstream_than_whole_resends() -> None:
    turns, switch_at = 6, 4
    with_ = await measure(True, turns, switch_at, chat=True)
    without = await measure(False, turns, switch_at, chat=True)
    assert with_.client_bytes == without.client_bytes
    up, whole = with_.upstream_bytes, without.upstream_bytes
    assert len(up) == len(whole) == turns
    # turns 1 and 2 go whole either way; from turn 3 only the new message goes
    assert up[2] < whole[2] and up[5] < whole[5]
    assert up[5] - up[2] < 64 < whole[5] - whole[2]  # flat with continuations, growing without
    assert up[switch_at - 1] > up[switch_at]  # the switched turn went whole, the next did not
    assert "| total |" in report(turns, switch_at, with_, without, chat=True)
