"""Per-axis field geometry: the span of unit 0, the jump, and how convolutions, shifts and merges change them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Dim:
    """The field of unit 0 along one input axis, and the input span any unit of the tensor depends on."""
    lo: float          # first input pixel of unit 0's field
    hi: float          # last input pixel of unit 0's field
    J: float | None    # jump; None once the axis is "whole"
    whole: bool = False
    elo: float = 0.0   # first and last input pixel that any unit of the tensor depends on: positions that
    ehi: float = 0.0   # only padding or skipped units reach must not count when the axis collapses

    @property
    def R(self) -> float:
        """Size of the field."""
        return self.hi - self.lo + 1

    @property
    def start(self) -> float:
        """Centre of unit 0's field."""
        return (self.lo + self.hi) / 2


@dataclass(frozen=True)
class State:
    """Where a tensor carries each input axis, and its field along it."""
    dims: tuple[int | None, ...]   # tensor dim that carries each input axis (None: no longer a tensor dim)
    fields: tuple[Dim, ...]


class Unsupported(ValueError):
    """An op whose effect on positions the recurrence cannot describe."""


def num(v: float | None) -> float | int | None:
    """A value for tables: an int when whole, else rounded to 6 decimals."""
    if v is None:
        return None
    v = float(v)
    return int(round(v)) if abs(v - round(v)) < 1e-9 else round(v, 6)


def centre_unit(start: float, j: float, n: int, m: int) -> int:
    """Index of the unit (of m) whose field is centred nearest the middle of an axis of n input pixels."""
    return int(min(max(round(((n - 1) / 2 - start) / j), 0), m - 1))


def _whole(lo: float, hi: float, elo: float, ehi: float) -> Dim:
    lo, hi = max(lo, elo), min(hi, ehi)
    return Dim(lo, hi, None, True, lo, hi)


def clip(d: Dim) -> Dim:
    """One position seen by every unit: the axis becomes whole with that position's (real) field."""
    return d if d.whole else _whole(d.lo, d.hi, d.elo, d.ehi)


def collapse(d: Dim, m: int) -> Dim:
    """Union over the m positions of an axis that stops being positional."""
    if d.whole:
        return d
    return _whole(d.lo, d.hi + (m - 1) * d.J, d.elo, d.ehi)


def _used(m_in: int, m_out: int, k: int, s: int, p: int, dil: int) -> tuple[int, int] | None:
    """First and last input unit that any of the m_out output units reads (the rest is padding or skipped)."""
    def taps(u):
        return [i for i in (u * s - p + dil * t for t in range(k)) if 0 <= i < m_in]
    first = next((min(t) for u in range(m_out) if (t := taps(u))), None)
    last = next((max(t) for u in reversed(range(m_out)) if (t := taps(u))), None)
    return None if first is None else (first, last)


def _narrow(d: Dim, used: tuple[int, int] | None) -> tuple[float, float]:
    if used is None:
        return d.elo, d.ehi
    return max(d.elo, d.lo + used[0] * d.J), min(d.ehi, d.hi + used[1] * d.J)


def conv_dim(d: Dim, k: int, s: int, p: int, dil: int, m_in: int, m_out: int) -> Dim:
    """The recurrence for one conv / pool axis (kernel k, stride s, padding p, dilation dil)."""
    if d.whole:
        return d
    elo, ehi = _narrow(d, _used(m_in, m_out, k, s, p, dil))
    return Dim(d.lo - p * d.J, d.hi + (dil * (k - 1) - p) * d.J, d.J * s, False, elo, ehi)


def shift(d: Dim, offset: float, step: int = 1, used: tuple[int, int] | None = None) -> Dim:
    """Unit 0 becomes old unit `offset` (slicing, padding); `used` = old units still present."""
    if d.whole:
        return d
    elo, ehi = _narrow(d, used)
    return Dim(d.lo + offset * d.J, d.hi + offset * d.J, d.J * step, False, elo, ehi)


def union(a: Dim, b: Dim) -> tuple[Dim, str]:
    """The field of a unit that depends on both fields, with a note when the result is only approximate."""
    if a.whole or b.whole:
        note = "" if a.whole and b.whole else \
            "a global branch (e.g. a squeeze-excitation gate) joins a local one: every unit sees the whole input"
        return _whole(min(a.lo, b.lo), max(a.hi, b.hi), min(a.elo, b.elo), max(a.ehi, b.ehi)), note
    note = ""
    if a.J != b.J:
        note = f"merged branches have different jumps ({num(a.J)}, {num(b.J)}): exact for the first unit only"
    return Dim(min(a.lo, b.lo), max(a.hi, b.hi), min(a.J, b.J), False, min(a.elo, b.elo), max(a.ehi, b.ehi)), note


def merge(states: list[State], out_dims: list[Callable[[int], int]], n_ax: int) -> tuple[State, str]:
    """Union of the fields of several inputs; `out_dims[i]` maps a dim of input i to its output dim."""
    dims: list[int | None] = [None] * n_ax
    fields: list[Dim | None] = [None] * n_ax
    notes = []
    for st, to_out in zip(states, out_dims):
        for ax in range(n_ax):
            d = st.dims[ax]
            od = None if d is None else to_out(d)
            if od is not None:
                if dims[ax] is not None and dims[ax] != od:
                    raise Unsupported(f"inputs carry spatial axis {ax} at different dims ({dims[ax]}, {od})")
                dims[ax] = od
            f = st.fields[ax]
            if fields[ax] is None:
                fields[ax] = f
            else:
                fields[ax], note = union(fields[ax], f)
                if note:
                    notes.append(note)
    return State(tuple(dims), tuple(fields)), "; ".join(dict.fromkeys(notes))
