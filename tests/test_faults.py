"""mirrord.faults: the transmit-path fault injector (pure, no I/O)."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mirrord.faults import DEFAULT_REORDER_DEPTH, FaultInjector, parse_fault_spec

FRAMES = 50_000
DST = b"\x02\x00\x00\x00\x00\x01"


def _frames(n: int) -> list[bytes]:
    return [i.to_bytes(4, "big") + b"payload" for i in range(n)]


def _run(inj: FaultInjector, frames) -> list:
    out = []
    for f in frames:
        out += inj.apply(f, DST)
    return out + inj.flush()


def test_no_faults_is_a_transparent_pass_through():
    inj = FaultInjector()
    frames = _frames(1000)
    out = _run(inj, frames)
    assert [f for f, _ in out] == frames
    assert all(d == DST for _, d in out)
    assert all(a is b for (a, _), b in zip(out, frames))  # no copies when nothing happens
    assert inj.counters() == {"dropped": 0, "duplicated": 0, "reordered": 0, "corrupted": 0}


@pytest.mark.parametrize("name,key", [("loss", "dropped"), ("duplicate", "duplicated"),
                                      ("reorder", "reordered"), ("corrupt", "corrupted")])
def test_each_rate_is_roughly_honoured(name, key):
    rate = 0.05
    inj = FaultInjector(**{name: rate}, seed=7)
    _run(inj, _frames(FRAMES))
    count = inj.counters()[key]
    # Binomial(50000, 0.05): sd ~49; 5 sd either side.
    assert abs(count - rate * FRAMES) < 250, count
    assert all(v == 0 for k, v in inj.counters().items() if k != key)


def test_nothing_is_lost_except_by_the_loss_rate():
    inj = FaultInjector(loss=0.05, duplicate=0.02, reorder=0.05, corrupt=0.0, seed=3)
    frames = _frames(FRAMES)
    out = _run(inj, frames)
    c = inj.counters()
    seen = Counter(bytes(f) for f, _ in out)
    missing = [f for f in frames if f not in seen]
    assert len(missing) == c["dropped"]
    assert sum(n - 1 for n in seen.values()) == c["duplicated"]
    assert set(seen) <= set(frames)
    assert len(out) == FRAMES - c["dropped"] + c["duplicated"]


def test_reordered_frames_come_out_a_few_frames_later_and_flush_releases_the_rest():
    inj = FaultInjector(reorder=0.2, seed=11, reorder_depth=4)
    frames = _frames(2000)
    out = []
    for f in frames:
        out += inj.apply(f, DST)
    held = inj.held
    tail = inj.flush()
    assert len(tail) == held and inj.held == 0 and inj.flush() == []
    order = [int.from_bytes(f[:4], "big") for f, _ in out + tail]
    assert sorted(order) == list(range(2000))
    assert order != list(range(2000))
    # A held frame is overtaken by at most reorder_depth later frames
    # (plus frames released alongside it); never by hundreds.
    displacement = max(pos - seq for pos, seq in enumerate(order[: len(out)]))
    assert displacement <= 4 * 2


def test_corruption_changes_exactly_one_byte_of_a_copy():
    inj = FaultInjector(corrupt=0.5, seed=5)
    originals = [bytearray(b"%05d-some-frame-bytes" % i) for i in range(500)]
    snapshot = [bytes(f) for f in originals]
    out = _run(inj, originals)
    assert [bytes(f) for f in originals] == snapshot  # caller's buffers untouched
    corrupted = 0
    for (sent, _), original in zip(out, snapshot):
        diff = sum(1 for x, y in zip(sent, original) if x != y)
        assert len(sent) == len(original) and diff in (0, 1)
        corrupted += diff
    assert corrupted == inj.counters()["corrupted"] > 200


def test_flush_releases_held_frames_in_the_order_they_were_held():
    inj = FaultInjector(reorder=0.99, duplicate=0.5, seed=2, reorder_depth=100)
    frames = _frames(5)
    assert [p for f in frames for p in inj.apply(f, DST)] == []
    assert inj.held >= 5
    released = inj.flush()
    ids = [int.from_bytes(f[:4], "big") for f, _ in released]
    assert ids == sorted(ids)  # held order = arrival order
    assert set(ids) == set(range(5)) and len(ids) == 5 + inj.counters()["duplicated"]
    assert all(d == DST for _, d in released)


def test_held_frames_do_not_change_when_the_caller_reuses_its_buffer():
    inj = FaultInjector(reorder=0.99, seed=1)
    buf = bytearray(b"first")
    assert inj.apply(buf, DST) == []
    buf[:] = b"XXXXX"
    assert [bytes(f) for f, _ in inj.flush()] == [b"first"]


def test_same_seed_same_faults():
    spec = dict(loss=0.1, duplicate=0.1, reorder=0.1, corrupt=0.1)
    a = _run(FaultInjector(**spec, seed=42), _frames(3000))
    b = _run(FaultInjector(**spec, seed=42), _frames(3000))
    c = _run(FaultInjector(**spec, seed=43), _frames(3000))
    assert [bytes(f) for f, _ in a] == [bytes(f) for f, _ in b]
    assert [bytes(f) for f, _ in a] != [bytes(f) for f, _ in c]


@pytest.mark.parametrize("name", ["loss", "duplicate", "reorder", "corrupt"])
@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "x"])
def test_bad_rates_are_refused_by_name(name, bad):
    with pytest.raises(ValueError, match=name):
        FaultInjector(**{name: bad})


def test_bad_depth_and_seed_are_refused():
    for depth in (0, -1, 2.5, True, 10**6):
        with pytest.raises(ValueError, match="reorder_depth"):
            FaultInjector(reorder_depth=depth)
    with pytest.raises(ValueError, match="seed"):
        FaultInjector(seed="7")


def test_parse_fault_spec():
    inj = parse_fault_spec("loss=0.05,dup=0.01,reorder=0.02,corrupt=0.001,seed=7")
    assert (inj.loss, inj.duplicate, inj.reorder, inj.corrupt, inj.seed) == \
        (0.05, 0.01, 0.02, 0.001, 7)
    assert inj.reorder_depth == DEFAULT_REORDER_DEPTH
    assert parse_fault_spec(" drop=0.5 , depth=9 ").reorder_depth == 9
    assert parse_fault_spec("").counters()["dropped"] == 0


@pytest.mark.parametrize("spec,message", [
    ("loss=2", "loss"),
    ("dup=abc", "dup"),
    ("jitter=0.1", "unknown fault 'jitter'"),
    ("loss", "not key=value"),
    ("loss=0.1,loss=0.2", "given twice"),
    ("seed=x", "seed"),
])
def test_parse_fault_spec_errors_name_the_culprit(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_fault_spec(spec)


rates = st.floats(min_value=0.0, max_value=0.9)


@settings(max_examples=60, deadline=None)
@given(loss=rates, dup=rates, reorder=rates, corrupt=rates, seed=st.integers(0, 2**32),
       depth=st.integers(1, 8), n=st.integers(0, 300))
def test_conservation_for_any_rates(loss, dup, reorder, corrupt, seed, depth, n):
    """Every frame comes out 0 (lost), 1 or 2 (duplicated) times, after flush."""
    inj = FaultInjector(loss=loss, duplicate=dup, reorder=reorder, corrupt=corrupt,
                        seed=seed, reorder_depth=depth)
    frames = _frames(n)
    out = _run(inj, frames)
    c = inj.counters()
    assert len(out) == n - c["dropped"] + c["duplicated"]
    ids = Counter(int.from_bytes(bytes(f[:4]), "big") for f, _ in out)
    # Corruption may hit the id bytes, so check totals rather than identities.
    assert sum(ids.values()) == len(out)
    assert c["reordered"] <= n - c["dropped"] and inj.held == 0
