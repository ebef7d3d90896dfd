"""A frame-level fault injector for the transmit path (this kernel has no netem).

Strategy
--------
The injector sits between the protocol and the socket: the link loop passes
every outgoing ``(frame, dst)`` through :meth:`FaultInjector.apply` and sends
whatever comes back.  Each frame independently, with its own probability:

1. *loss*: the frame is dropped (nothing else is decided for it);
2. *corruption*: a copy with one random byte XORed with a random non-zero
   mask goes out instead (the caller's buffer is never written);
3. *duplication*: the frame goes out twice, back to back;
4. *reordering*: the frame (and its duplicate) is held back and released
   after 1..``reorder_depth`` later frames have passed through, i.e. behind
   them on the wire.  Held frames are copied, so a caller that reuses its
   buffers after ``apply`` returns cannot change them.

One seeded ``random.Random`` drives every decision, in a fixed order, so a
given seed and frame sequence always produce the same faults (the rates are
therefore "roughly honoured": exactly reproducible, binomially distributed).
Nothing is ever lost except by the loss decision: a held frame is released
by later traffic or by :meth:`flush`, which the link should call when it goes
idle or closes.

Counters (``counters()``): frames dropped, duplicated, reordered (held back)
and corrupted.
"""

from __future__ import annotations

import random
from typing import Any

__all__ = ["FaultInjector", "parse_fault_spec"]

# Reordered frames are released after 1..DEFAULT_REORDER_DEPTH later frames:
# deep enough to exercise the receiver's reorder buffer and selective acks,
# shallow enough that a held frame does not look lost to the sender's RTO.
DEFAULT_REORDER_DEPTH = 3
# A depth beyond a sliding window's worth of frames would turn reordering
# into loss from the sender's point of view; refuse absurd values.
MAX_REORDER_DEPTH = 1024

_RATE_NAMES = ("loss", "duplicate", "reorder", "corrupt")

# Keys accepted by parse_fault_spec (short forms for command lines).
_SPEC_KEYS = {
    "loss": "loss", "drop": "loss",
    "dup": "duplicate", "duplicate": "duplicate",
    "reorder": "reorder",
    "corrupt": "corrupt",
    "seed": "seed",
    "depth": "reorder_depth", "reorder_depth": "reorder_depth",
}


def _check_rate(name: str, value: Any) -> float:
    try:
        rate = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: {value!r} is not a number") from None
    # NaN fails both comparisons, so it is rejected too.
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1), got {value!r}")
    return rate


class FaultInjector:
    """Drop, duplicate, reorder and corrupt outgoing frames at given rates."""

    def __init__(self, loss: float = 0.0, duplicate: float = 0.0, reorder: float = 0.0,
                 corrupt: float = 0.0, seed: int = 0,
                 reorder_depth: int = DEFAULT_REORDER_DEPTH) -> None:
        self.loss = _check_rate("loss", loss)
        self.duplicate = _check_rate("duplicate", duplicate)
        self.reorder = _check_rate("reorder", reorder)
        self.corrupt = _check_rate("corrupt", corrupt)
        if isinstance(reorder_depth, bool) or not isinstance(reorder_depth, int) \
                or not 1 <= reorder_depth <= MAX_REORDER_DEPTH:
            raise ValueError(f"reorder_depth must be an integer in 1..{MAX_REORDER_DEPTH}, "
                             f"got {reorder_depth!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.seed = seed
        self.reorder_depth = reorder_depth
        self._rng = random.Random(seed)
        self._tick = 0  # frames seen so far: the clock held frames are released by
        # Frames held back for reordering, oldest first: (release tick, copies).
        self._held: list[tuple[int, list[tuple[bytes, Any]]]] = []
        self._dropped = self._duplicated = self._reordered = self._corrupted = 0

    def apply(self, frame, dst) -> list[tuple[Any, Any]]:
        """Decide this frame's fate; return the ``(frame, dst)`` pairs to send now.

        The list may be empty (dropped or held), hold the frame twice
        (duplicated), a corrupted copy, and/or earlier held frames now due.
        ``frame`` is never modified.
        """
        self._tick += 1
        rnd = self._rng.random
        out: list[tuple[Any, Any]] = []
        if self.loss and rnd() < self.loss:
            self._dropped += 1
        else:
            if self.corrupt and rnd() < self.corrupt and len(frame) > 0:
                frame = self._corrupted_copy(frame)
                self._corrupted += 1
            copies = [(frame, dst)]
            if self.duplicate and rnd() < self.duplicate:
                copies.append((frame, dst))
                self._duplicated += 1
            if self.reorder and rnd() < self.reorder:
                # Copy: the caller may reuse its buffer once we return.
                kept = bytes(frame)
                release = self._tick + self._rng.randint(1, self.reorder_depth)
                self._held.append((release, [(kept, d) for _, d in copies]))
                self._reordered += 1
            else:
                out.extend(copies)
        if self._held and self._held[0][0] <= self._tick:
            self._release_due(out)
        return out

    def _corrupted_copy(self, frame) -> bytearray:
        damaged = bytearray(frame)
        damaged[self._rng.randrange(len(damaged))] ^= self._rng.randint(1, 255)
        return damaged

    def _release_due(self, out: list) -> None:
        still_held = []
        for release, copies in self._held:
            if release <= self._tick:
                out.extend(copies)
            else:
                still_held.append((release, copies))
        self._held = still_held

    def flush(self) -> list[tuple[Any, Any]]:
        """Release every held frame now, in the order they were held."""
        out = [pair for _, copies in self._held for pair in copies]
        self._held = []
        return out

    @property
    def held(self) -> int:
        """How many frames (counting duplicates) are currently held back."""
        return sum(len(copies) for _, copies in self._held)

    def counters(self) -> dict[str, int]:
        """Faults injected so far: dropped, duplicated, reordered, corrupted."""
        return {"dropped": self._dropped, "duplicated": self._duplicated,
                "reordered": self._reordered, "corrupted": self._corrupted}

    def __repr__(self) -> str:
        return (f"FaultInjector(loss={self.loss}, duplicate={self.duplicate}, "
                f"reorder={self.reorder}, corrupt={self.corrupt}, seed={self.seed}, "
                f"reorder_depth={self.reorder_depth})")


def parse_fault_spec(spec: str) -> FaultInjector:
    """Build a FaultInjector from ``"loss=0.05,dup=0.01,reorder=0.02,corrupt=0.001,seed=7"``.

    Keys: loss (or drop), dup (or duplicate), reorder, corrupt, seed,
    depth (or reorder_depth).  Unset rates are 0.  Raises ValueError naming
    the offending key or value.
    """
    kwargs: dict[str, Any] = {}
    for item in spec.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or not value:
            raise ValueError(f"fault spec item {item!r} is not key=value")
        name = _SPEC_KEYS.get(key)
        if name is None:
            raise ValueError(f"unknown fault {key!r}; expected one of "
                             f"{', '.join(sorted(_SPEC_KEYS))}")
        if name in kwargs:
            raise ValueError(f"fault {key!r} given twice")
        if name in ("seed", "reorder_depth"):
            try:
                kwargs[name] = int(value, 0)
            except ValueError:
                raise ValueError(f"{key}: {value!r} is not an integer") from None
        else:
            kwargs[name] = _check_rate(key, value)
    return FaultInjector(**kwargs)
