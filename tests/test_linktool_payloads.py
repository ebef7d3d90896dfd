"""mirrord-link's sender stream (linktool.Payloads): stamped for checking, or one buffer."""

from __future__ import annotations

from mirrord.linktool import Payloads


def test_stamped_messages_carry_their_index_and_rotate_through_the_slots():
    payloads = Payloads(seed=1, message_size=64, slots=3)
    first = [bytes(payloads.message(i, 64)) for i in range(3)]
    assert [int.from_bytes(m[:8], "big") for m in first] == [0, 1, 2]
    assert len({m[8:] for m in first}) == 3  # each slot has its own content
    again = bytes(payloads.message(3, 64))  # slot 0 again, restamped
    assert int.from_bytes(again[:8], "big") == 3 and again[8:] == first[0][8:]
    assert len(payloads.message(4, 10)) == 10  # a short last message


def test_unstamped_messages_are_one_buffer_never_rewritten():
    payloads = Payloads(seed=1, message_size=64, slots=3, stamped=False)
    original = bytes(payloads.slots[0])
    views = [payloads.message(i, 64) for i in range(5)]
    assert len(payloads.slots) == 1
    # Retransmitting any of them re-sends the same bytes: nothing was overwritten.
    assert all(bytes(v) == original for v in views)
    assert bytes(payloads.message(5, 16)) == original[:16]
