"""The control plane's running inflate/deflate sums (:class:`SizeRates`) against the plain
definition: every change between consecutive samples whose later sample is in the window."""

from __future__ import annotations

import itertools
from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st

from vdev.policy.control import SizeRates


def reference(samples: list[tuple[float, int]], now: float, window: float) -> tuple[float, float]:
    start = now - window
    up = down = 0
    for (_, before), (t, after) in itertools.pairwise(samples):
        if t >= start:
            up += max(after - before, 0)
            down += max(before - after, 0)
    return up / window, down / window


steps = st.lists(
    st.tuples(
        st.floats(0.0, 3.0),  # time to the next sample
        st.integers(0, 5000),  # the size then
        st.booleans(),  # read the rates after it
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(steps, st.sampled_from([0.5, 2.0, 10.0]), st.sampled_from([3, 8, 65536]))
def test_running_sums_match_the_definition(
    script: list[tuple[float, int, bool]], window: float, maxlen: int
) -> None:
    rates = SizeRates(maxlen=maxlen)
    kept: deque[tuple[float, int]] = deque(maxlen=maxlen)  # what the old deque held
    now = 0.0
    for gap, size, read in script:
        now += gap
        rates.add(now, size)
        if not kept or kept[-1][1] != size:
            kept.append((now, size))
        if read:
            got = rates.rates(now, window)
            want = reference(list(kept), now, window)
            assert got == want


def test_a_long_run_keeps_only_the_window() -> None:
    rates = SizeRates()
    everything = []
    for i in range(60_000):  # an hour of steady inflation, 1k pages per sample
        rates.add(i * 0.06, i * 1000)
        everything.append((i * 0.06, i * 1000))
    assert rates.rates(3600.0, 10.0) == reference(everything, 3600.0, 10.0)
    assert rates.rates(3600.0, 10.0)[0] > 16_000
    assert len(rates.samples) <= 10 / 0.06 + 3  # the samples before the window are gone


def test_an_unchanged_size_is_not_a_sample_and_an_old_change_is_not_a_rate() -> None:
    rates = SizeRates()
    rates.add(0.0, 100)
    rates.add(1.0, 100)
    assert len(rates.samples) == 1
    rates.add(2.0, 300)
    assert rates.rates(3.0, 10.0) == (20.0, 0.0)
    assert rates.rates(100.0, 10.0) == (0.0, 0.0)  # the change ended before the window
    rates.add(101.0, 50)
    assert rates.rates(101.0, 10.0) == (0.0, 25.0)
