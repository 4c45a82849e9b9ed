"""bench.common's statistics helpers."""

from __future__ import annotations

import pytest

from bench.common import paired_median_diff, percentile


def test_percentile_interpolates_and_is_nan_when_empty() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 100) == 5.0
    assert percentile([], 50) != percentile([], 50)  # NaN


def test_paired_median_diff_cancels_a_drift_that_the_medians_keep() -> None:
    # The host slows down halfway through: the baseline's pairs ran mostly fast, the other side's mostly slow
    # (unequal counts per regime make the two medians fall in different regimes). Each pair still differs by 0.5.
    baseline = [10.0] * 6 + [20.0] * 5
    other = [x + 0.5 for x in baseline]
    other[5] = 20.5  # pair 5 ran right at the change: its difference is the odd one out
    assert percentile(other, 50) - percentile(baseline, 50) == pytest.approx(10.5)
    assert paired_median_diff(other, baseline) == pytest.approx(0.5)


def test_paired_median_diff_needs_pairs() -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        paired_median_diff([1.0, 2.0], [1.0])
