"""benchmarks/side_by_side.py: the implementations alternate within rounds, the ratio is the median of the
per-round ratios, and a spread that includes 1 (or is wide) is said to be inconclusive."""
import itertools
import time

from benchmarks.side_by_side import Ratio, compare


def test_rounds_alternate_and_rotate():
    order = []
    fns = {name: (lambda n=name: order.append(n)) for name in ("a", "b", "c")}
    cmp = compare(fns, device="cpu", baseline="a", rounds=3, warmup=0)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(len(t) == 3 for t in cmp.times.values())


def test_the_ratio_is_per_round_so_a_load_change_cancels():
    """Round r's load multiplies both times alike (the machine getting 20x slower halfway): per-round ratios
    stay 2, where a ratio of the two medians would not be."""
    load = itertools.chain([1.0] * 4, [20.0] * 20)
    state = {}

    def slow():
        state["l"] = next(load)
        time.sleep(0.002 * state["l"])

    def fast():
        time.sleep(0.001 * state["l"])
    cmp = compare({"eager": slow, "fastnlg": fast}, device="cpu", baseline="eager", rounds=8, warmup=0)
    r = cmp.ratio("fastnlg")
    assert 1.6 < r.median < 2.5, r
    assert r.verdict().startswith("faster") or r.verdict().startswith("inconclusive")


def test_verdicts():
    assert Ratio(1.8, 1.7, 1.9, 10).verdict() == "faster"
    assert Ratio(0.8, 0.75, 0.85, 10).verdict() == "slower"
    assert Ratio(1.05, 0.9, 1.2, 10).verdict().startswith("inconclusive")
    assert Ratio(2.0, 1.2, 3.0, 10).verdict().startswith("inconclusive")  # wider than 25% of the median
    assert "p20-p80" in str(Ratio(1.8, 1.7, 1.9, 10))


def test_stops_at_the_deadline():
    cmp = compare({"a": lambda: time.sleep(0.01), "b": lambda: None}, device="cpu", baseline="a", rounds=1000,
                  warmup=0, deadline=time.time() + 0.1)
    assert 3 <= len(cmp.times["a"]) < 100
