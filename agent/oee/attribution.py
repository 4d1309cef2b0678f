"""Counter deltas to the running time that made them (docs/oee.md "Counters"). Pure: no I/O,
no clock reads.

A delta between two good readings of a counter was made while the machine ran between them,
so it is spread over that running time (running states and microstops), piece by piece, in
proportion to the parts each piece could have made at its product's ideal rate. A piece lies
in one shift window's planned time (or in none: a break, time outside every shift), so the
parts land in the windows where they were made, and in the rolling window at their time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from agent.oee.products import IdealRates
from agent.oee.rolling import RollingHistory
from agent.oee.totals import ShiftTotals, Stop

# A counter that stays silent across this many pieces of running time has its oldest ones
# merged (per window and product), so memory stays bounded whatever the PLC does.
MAX_PIECES = 1024


class RunPiece(NamedTuple):
    """A stretch of running time (or of a stop that may be a microstop) of one product."""

    start: float
    end: float
    weight: float  # its seconds at the default ideal rate (IdealRates.weight)
    target: ShiftTotals | None  # the shift window whose planned time it lies in, if any
    product: str
    stop: Stop | None  # a stop's piece is running time only if the stop is a microstop


class Landing(NamedTuple):
    """Where a reading landed: the window of its instant's planned time (if any), the product."""

    target: ShiftTotals | None
    product: str


class CounterSpread:
    """One counter: how far its parts are attributed, and the running time since then."""

    __slots__ = ("idle", "landing", "parts", "pieces", "spread_from", "until")

    def __init__(self) -> None:
        self.spread_from = -math.inf  # parts are attributed up to here (-inf: no reading yet)
        self.until = -math.inf  # its latest good reading
        self.parts = 0  # parts read up to `until` and not yet attributed (see `waits`)
        self.pieces: list[RunPiece] = []  # running time after spread_from, in time order
        self.idle = True  # no pieces and no parts: the engine's fast path may take a reading
        self.landing = Landing(None, "")  # where its latest reading landed


def split_whole(total: int, weights: Sequence[float]) -> list[int]:
    """`total` in proportion to `weights` as whole numbers that add up to `total`: each gets
    its share rounded down, and what is left goes one by one to the largest remainders
    (ties to the earlier one)."""
    whole = sum(weights)
    if len(weights) == 1 or whole <= 0:
        return [total, *([0] * (len(weights) - 1))]
    exact = [total * weight / whole for weight in weights]
    shares = [math.floor(share) for share in exact]
    left = total - sum(shares)
    by_remainder = sorted(range(len(exact)), key=lambda i: (shares[i] - exact[i], i))
    for step in range(left):
        shares[by_remainder[step % len(shares)]] += 1
    for i in reversed(by_remainder):  # float noise may push a share just past a whole
        if left >= 0:
            break
        if shares[i] > 0:
            shares[i] -= 1
            left += 1
    return shares


def _is_running(piece: RunPiece) -> bool:
    stop = piece.stop
    return stop is None or stop.microstop is True


class PartsAttribution:
    """Spreads each counter's deltas over the running time between its readings."""

    __slots__ = ("_history", "_last_running", "_rates", "_stop_tail", "counters", "late_parts")

    def __init__(self, *, rates: IdealRates, history: RollingHistory | None) -> None:
        self._rates = rates
        self._history = history
        self.counters = (CounterSpread(), CounterSpread(), CounterSpread())  # by CounterSlot
        self._last_running: RunPiece | None = None  # the latest piece of running time
        self._stop_tail: RunPiece | None = None  # the latest piece of a stop
        self.late_parts = 0  # parts counted where their reading landed: their window was final

    def add_piece(
        self, start: float, end: float, target: ShiftTotals | None, product: str, stop: Stop | None
    ) -> None:
        """Running time (or a stop not known to be downtime) of `product` over [start, end]."""
        weight = self._rates.weight(product, end - start)
        piece = RunPiece(start, end, weight, target, product, stop)
        if stop is None:
            self._last_running = piece
        else:
            self._stop_tail = piece
        for counter in self.counters:
            since = counter.spread_from
            if end <= since or since == -math.inf:
                continue
            pieces = counter.pieces
            counter.idle = False
            if start < since:  # the part before the counter's latest attribution is done
                pieces.append(self._clip(piece, since, end))
            else:
                pieces.append(piece)
            if len(pieces) > MAX_PIECES:
                counter.pieces = compact(pieces)

    def _clip(self, piece: RunPiece, start: float, end: float) -> RunPiece:
        weight = self._rates.weight(piece.product, end - start)
        return piece._replace(start=start, end=end, weight=weight)

    def stop_ended_short(self, stop: Stop) -> None:
        """`stop` turned out a microstop: its last piece may be the latest running time."""
        tail = self._stop_tail
        if tail is not None and tail.stop is stop:
            self._last_running = tail

    def counted_until(self) -> float:
        """Every counter's parts are attributed up to here (inf: no counter was read)."""
        return min(
            (c.spread_from for c in self.counters if c.spread_from != -math.inf), default=math.inf
        )

    def reading(
        self,
        slot: int,
        ts: float,
        parts: int,
        product: str,
        window: ShiftTotals | None,
        running_since: float | None,
        undecided: Stop | None,
    ) -> None:
        """A good reading of counter `slot` at `ts` adding `parts`, while `product` runs;
        `window`: the shift window whose planned time `ts` is in (None: none, or no state
        read yet); `running_since`: where the running episode's time not yet accounted
        begins (None: the machine is not running); `undecided`: the open stop still shorter
        than the threshold."""
        counter = self.counters[slot]
        since = counter.spread_from
        if since == -math.inf:  # the baseline
            counter.spread_from = counter.until = ts
            return
        counter.parts += parts
        counter.until = ts
        counter.landing = Landing(window, product)
        if counter.parts and undecided is not None and undecided.start < ts:
            # Whether the open stop's time is running time (a microstop) or downtime is not
            # known yet: the parts wait for its decision (at most microstop_threshold).
            counter.idle = False
            return
        open_piece = None
        if running_since is not None:
            start = max(running_since, since)
            if ts > start:
                weight = self._rates.weight(product, ts - start)
                open_piece = RunPiece(start, ts, weight, window, product, None)
        self._settle(slot, counter, open_piece)

    def stop_decided(self) -> None:
        """The open stop was decided: attribute the parts that waited for it."""
        for slot, counter in enumerate(self.counters):
            if counter.parts:
                self._settle(slot, counter, None)

    def _settle(self, slot: int, counter: CounterSpread, open_piece: RunPiece | None) -> None:
        """Attribute the counter's parts up to its latest reading."""
        until = counter.until
        taken: list[RunPiece] = []
        kept: list[RunPiece] = []
        for piece in counter.pieces:
            if piece.end <= until:
                taken.append(piece)
            elif piece.start >= until:
                kept.append(piece)
            else:  # a piece accounted after the reading, begun before it
                share = piece.weight * (until - piece.start) / (piece.end - piece.start)
                taken.append(piece._replace(end=until, weight=share))
                kept.append(piece._replace(start=until, weight=piece.weight - share))
        if open_piece is not None:
            taken.append(open_piece)
        counter.pieces = kept
        counter.idle = not kept
        counter.spread_from = until
        parts, counter.parts = counter.parts, 0
        if parts:
            self._attribute(slot, parts, [p for p in taken if _is_running(p)], counter)

    def _attribute(
        self, slot: int, parts: int, running: list[RunPiece], counter: CounterSpread
    ) -> None:
        if not running:
            # No running time between the readings (a counter that counts late, a part
            # counted after a fault): the parts go to the latest running time before them,
            # else to where the reading landed.
            last = self._last_running
            if last is not None:
                point = RunPiece(last.end, last.end, 0.0, last.target, last.product, None)
            else:
                at, landing = counter.until, counter.landing
                point = RunPiece(at, at, 0.0, landing.target, landing.product, None)
            self._credit(slot, parts, [point], counter.landing)
            return
        # One share per window and product (what a reader checks by hand), then per piece
        # (for the rolling window).
        groups: dict[tuple[int, str], list[RunPiece]] = {}
        for piece in running:
            groups.setdefault((id(piece.target), piece.product), []).append(piece)
        members = list(groups.values())
        weights = [sum(piece.weight for piece in group) for group in members]
        for group, share in zip(members, split_whole(parts, weights), strict=True):
            if share:
                self._credit(slot, share, group, counter.landing)

    def _credit(self, slot: int, parts: int, group: list[RunPiece], landing: Landing) -> None:
        """`parts` made over the pieces of `group` (one window, one product)."""
        first = group[0]
        target, product = first.target, first.product
        if target is None:
            return  # made outside planned time: they count nowhere
        history = self._history
        if history is not None:
            shares = split_whole(parts, [piece.weight for piece in group])
            for piece, share in zip(group, shares, strict=True):
                if share:
                    history.add_parts(piece.start, piece.end, slot, share, product)
        if target.final:
            # Its final record was published: the parts count where the reading landed.
            self.late_parts += parts
            target = landing.target
            if target is None or target.final:
                return
        target.parts_of(product)[slot] += parts


def compact(pieces: list[RunPiece]) -> list[RunPiece]:
    """Merge a silent counter's pieces: per window and product (windows whose record is
    final all together, since their parts land elsewhere anyway), then, if that is still too
    many, per window alone. Pieces of an undecided stop stay as they are."""
    merged = _merge(pieces, with_product=True)
    if len(merged) > MAX_PIECES // 2:
        merged = _merge(merged, with_product=False)
    return merged


def _merge(pieces: list[RunPiece], *, with_product: bool) -> list[RunPiece]:
    groups: dict[tuple[object, str], RunPiece] = {}
    undecided: list[RunPiece] = []
    for piece in pieces:
        stop = piece.stop
        if stop is not None and stop.microstop is None:
            undecided.append(piece)
            continue
        if not _is_running(piece):
            continue  # downtime after all: it makes no parts
        target = piece.target
        where: object = "final" if target is not None and target.final else id(target)
        key = (where, piece.product if with_product else "")
        found = groups.get(key)
        if found is None:
            groups[key] = piece._replace(stop=None)
        else:
            groups[key] = found._replace(
                start=min(found.start, piece.start),
                end=max(found.end, piece.end),
                weight=found.weight + piece.weight,
            )
    return [*groups.values(), *undecided]
