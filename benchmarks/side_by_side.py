"""Speed ratios measured side by side (DESIGN.md §5): the implementations run alternately on the same inputs in
one process, so that a change in the machine's load hits all of them alike, and the ratio is the median of the
per-round ratios with its p20-p80 spread.

    result = compare({"fastnlg": f, "eager": g}, device="cuda", baseline="eager", rounds=15)
    result.ratio("fastnlg")        # Ratio(median=1.8, p20=1.7, p80=1.9, rounds=15): eager time / fastnlg time
    result.ms["fastnlg"]           # Timing(median, p20, p80) of its own calls

One round runs every implementation once, in an order that rotates from round to round (no implementation
always runs first, right after the others have warmed or cooled the caches). A ratio above 1 means the
implementation is faster than the baseline. `Ratio.verdict` says "faster", "slower", or, when the p20-p80
spread includes 1 or is wider than `max_spread` of the median, that the measurement cannot conclude.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Timing:
    median: float
    p20: float
    p80: float


@dataclass(frozen=True)
class Ratio:
    median: float
    p20: float
    p80: float
    rounds: int

    def verdict(self, max_spread: float = 0.25) -> str:
        if self.p20 <= 1.0 <= self.p80 or (self.p80 - self.p20) > max_spread * self.median:
            return (f"inconclusive: the p20-p80 spread {self.p20:.2f}-{self.p80:.2f}x is too wide to tell the two "
                    "apart")
        return "faster" if self.median > 1.0 else "slower"

    def __str__(self) -> str:
        return f"{self.median:.2f}x [p20-p80 {self.p20:.2f}-{self.p80:.2f}, {self.rounds} rounds]"


def quantiles(values) -> Timing:
    values = list(values)
    if len(values) == 1:
        return Timing(values[0], values[0], values[0])
    q = statistics.quantiles(values, n=5, method="inclusive")
    return Timing(statistics.median(values), q[0], q[3])


@dataclass
class Comparison:
    baseline: str
    times: dict  # name -> [ms per round]

    @property
    def ms(self) -> dict:
        return {name: quantiles(t) for name, t in self.times.items()}

    def ratio(self, name: str) -> Ratio:
        """baseline time / `name`'s time, per round; its median and p20-p80."""
        per_round = [b / t for b, t in zip(self.times[self.baseline], self.times[name]) if t > 0]
        q = quantiles(per_round)
        return Ratio(q.median, q.p20, q.p80, len(per_round))


def _timer(device: str):
    if device == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
    else:
        def timed(fn):
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
    return timed


def compare(fns: dict, *, device: str, baseline: str, rounds: int = 10, warmup: int = 2, calls: int = 1,
            deadline: float | None = None) -> Comparison:
    """Times each of `fns` (name -> zero-argument callable) once per round, alternating, after `warmup`
    untimed rounds; `calls` calls per timing (for short ops). Stops early, after at least 3 rounds, when
    time.time() passes `deadline`."""
    if baseline not in fns:
        raise ValueError(f"baseline {baseline!r} is not one of {sorted(fns)}")
    names = list(fns)
    timed = _timer(device)

    def run(fn):
        for _ in range(calls):
            fn()

    for _ in range(warmup):
        for name in names:
            run(fns[name])
    if device == "cuda":
        torch.cuda.synchronize()
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times[name].append(timed(lambda f=fns[name]: run(f)) / calls)
        if deadline is not None and r >= 2 and time.time() > deadline:
            break
    return Comparison(baseline, times)
