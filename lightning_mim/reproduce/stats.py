"""Seeds into numbers a table can hold, and a claim's verdict from two rows' numbers.

A cell is the mean, the sample standard deviation (n - 1) and the count n of one row's per-seed top-1. A claim "A > B"
holds when A's mean exceeds B's by at least twice the pooled standard error SE = sqrt(s_A^2 / n_A + s_B^2 / n_B),
is reversed when B's exceeds A's by as much, and is within noise otherwise; with one seed on either side there is no
spread to judge by, so no verdict."""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

HOLDS, REVERSED, WITHIN_NOISE, SINGLE_SEED, NO_RESULT = (
    "holds", "reversed", "within noise", "n = 1, no verdict", "no result")


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (None below two values) and count of one cell's values (mean None if none)."""

    mean: float | None
    std: float | None
    n: int


def summarize(values: Sequence[float]) -> Summary:
    if not values:
        return Summary(None, None, 0)
    return Summary(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None, len(values))


@dataclass(frozen=True)
class Verdict:
    """A claim "better > worse" on one protocol: the difference of the means, twice their pooled standard error
    (None without two values on each side), and the verdict."""

    difference: float | None
    noise: float | None
    verdict: str


def judge(better: Summary, worse: Summary) -> Verdict:
    if better.mean is None or worse.mean is None:
        return Verdict(None, None, NO_RESULT)
    difference = better.mean - worse.mean
    if better.std is None or worse.std is None:
        return Verdict(difference, None, SINGLE_SEED)
    noise = 2 * math.sqrt(better.std ** 2 / better.n + worse.std ** 2 / worse.n)
    if difference == 0 or abs(difference) < noise:
        return Verdict(difference, noise, WITHIN_NOISE)
    return Verdict(difference, noise, HOLDS if difference > 0 else REVERSED)


def shown_summary(summary: Summary, digits: int = 2) -> str:
    """`mean ± std (n = N)`, the mean alone with its n when there is no spread, "-" without values."""
    if summary.mean is None:
        return "-"
    spread = "" if summary.std is None else f" ± {summary.std:.{digits}f}"
    return f"{summary.mean:.{digits}f}{spread} (n = {summary.n})"
