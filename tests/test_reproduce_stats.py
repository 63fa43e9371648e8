"""lightning_mim.reproduce.stats against numbers computed by hand."""
from __future__ import annotations

import pytest

from lightning_mim.reproduce.stats import Summary, judge, shown_summary, summarize


def test_summary_is_mean_sample_std_and_n():
    # mean 72, deviations -2, 0, +2: sample variance (4 + 0 + 4) / 2 = 4, std 2
    assert summarize([70.0, 72.0, 74.0]) == Summary(72.0, 2.0, 3)
    # two values 50 and 51: variance 0.5 ** 2 * 2 / 1 = 0.5
    assert summarize([50.0, 51.0]).std == pytest.approx(0.5 ** 0.5)
    assert summarize([61.5]) == Summary(61.5, None, 1)  # one seed: no spread
    assert summarize([]) == Summary(None, None, 0)


def test_verdicts_against_twice_the_pooled_standard_error():
    # SE = sqrt(2^2 / 4 + 1^2 / 4) = sqrt(1.25) = 1.118..., so 2 SE = 2.236...
    lut, mae = Summary(75.0, 2.0, 4), Summary(72.0, 1.0, 4)
    holds = judge(lut, mae)
    assert (holds.difference, holds.noise, holds.verdict) == (3.0, pytest.approx(2.2360680), "holds")
    assert judge(mae, lut).verdict == "reversed"  # the same gap the other way
    # a gap of 2 < 2.236: within noise, either way round
    assert judge(Summary(74.0, 2.0, 4), mae).verdict == "within noise"
    assert judge(mae, Summary(74.0, 2.0, 4)).verdict == "within noise"
    # unequal n: SE = sqrt(3^2 / 3 + 0^2 / 2) = sqrt(3) = 1.732..., 2 SE = 3.464...; a gap of 3.5 is beyond it
    assert judge(Summary(80.0, 3.0, 3), Summary(76.5, 0.0, 2)).verdict == "holds"
    assert judge(Summary(80.0, 3.0, 3), Summary(76.6, 0.0, 2)).verdict == "within noise"
    # no spread at all on either side: any gap is a verdict, no gap is none
    assert judge(Summary(70.0, 0.0, 2), Summary(69.0, 0.0, 2)).verdict == "holds"
    assert judge(Summary(70.0, 0.0, 2), Summary(70.0, 0.0, 2)).verdict == "within noise"


def test_one_seed_or_no_result_gives_no_verdict():
    single = judge(Summary(75.0, None, 1), Summary(72.0, 1.0, 3))
    assert (single.difference, single.noise, single.verdict) == (3.0, None, "n = 1, no verdict")
    assert judge(Summary(72.0, 1.0, 3), Summary(75.0, None, 1)).verdict == "n = 1, no verdict"
    assert judge(Summary(None, None, 0), Summary(72.0, 1.0, 3)).verdict == "no result"


def test_summary_as_a_cell():
    assert shown_summary(Summary(72.0, 2.0, 3)) == "72.00 ± 2.00 (n = 3)"
    assert shown_summary(Summary(61.5, None, 1)) == "61.50 (n = 1)"
    assert shown_summary(Summary(None, None, 0)) == "-"
