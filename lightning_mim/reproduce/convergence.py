"""Whether a table's runs were trained to a plateau, read from their curves: each pre-training's `train/loss` in its
TensorBoard run, and each linear probe's / fine-tuning's validation curve (`late_gain` in results.csv, from its
curve.csv). At the small presets, whose fine-tuning budget is this suite's own choice, a trained-protocol cell is
published only where every seed's curve has flattened; at paper scale the paper's recipe fixes the epochs, so the
curves are reported without gating the cells."""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_mim.eval.curve import LATE_FRACTION

if TYPE_CHECKING:
    from lightning_mim.reproduce.results import RowResult

# A linear probe or fine-tuning has plateaued when the best val top-1 of the last quarter of its validated epochs is
# less than this many points above the best before it.
PLATEAU_POINTS = 1.0
# A pre-training loss has flattened when less than this share of its fall (from the first to the last tenth of the
# steps) came in the last fifth of the steps.
FLAT_SHARE = 0.05
# The presets whose trained-protocol cells need a plateau: their epochs are this suite's choice, not a paper's.
GATED_PRESETS = ("smoke", "demo", "gpu")
NOT_CONVERGED = "not converged"
LOSS_TAG = "train/loss"


@dataclass(frozen=True)
class LossFall:
    """A pre-training loss curve in three numbers: the mean over its first and its last tenth of the steps, and the
    share of that fall which came in the last fifth of the steps (None when the loss did not fall)."""

    start: float
    end: float
    late_share: float | None

    @property
    def flat(self) -> bool:
        return self.late_share is not None and self.late_share < FLAT_SHARE


def window_mean(points: list[tuple[int, float]], low: float, high: float) -> float | None:
    values = [value for step, value in points if low < step <= high]
    return statistics.fmean(values) if values else None


def loss_fall(points: list[tuple[int, float]]) -> LossFall | None:
    """(step, loss) points -> LossFall: windows of a tenth of the last step, the fall of the last fifth measured
    between the windows centred at 75 % and 95 % of it; None when a window is empty (too few logged steps)."""
    if not points:
        return None
    last = max(step for step, _ in points)
    start = window_mean(points, -1, 0.1 * last)
    before = window_mean(points, 0.7 * last, 0.8 * last)
    end = window_mean(points, 0.9 * last, last)
    if start is None or before is None or end is None:
        return None
    share = (before - end) / (start - end) if start > end else None
    return LossFall(start, end, share)


def logged_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of a TensorBoard run as (step, value) points in step order, read once (none when the run
    folder does not exist); a resumed run re-logs some steps, and the latest value of a step wins."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not run_dir.is_dir():
        return {}
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: sorted({event.step: event.value for event in events.Scalars(tag)}.items())
            for tag in events.Tags()["scalars"]}


def plateaued(gain: float | None) -> bool:
    """A validation curve's late gain below PLATEAU_POINTS; an unknown gain (too few validated epochs) is not."""
    return gain is not None and gain < PLATEAU_POINTS


def convergence_note(preset: str) -> str:
    gated = preset in GATED_PRESETS
    return (f"Pre-training: the `{LOSS_TAG}` mean over the first and the last tenth of the steps, and the share of "
            f"that fall which came in the last fifth of the steps (flat below {FLAT_SHARE:.0%}). Linear probe and "
            f"fine-tuning: the points by which the best val top-1 of the last {LATE_FRACTION:.0%} of the validated "
            f"epochs exceeds the best before them (a plateau below {PLATEAU_POINTS:g} point). "
            + (f"At this preset a trained-protocol cell whose seeds have not all plateaued reads \"{NOT_CONVERGED}\" "
               f"(its numbers stay in table.json) and is left out of the verdicts: raise the epochs "
               f"(`EVAL_ARGS=\"--finetune-epochs N\"`) and run again." if gated else
               "At paper scale the paper's recipe fixes the epochs: the cells are the recipe's, whatever the curve."))


def convergence_records(rows: list[RowResult]) -> list[dict[str, Any]]:
    """One record per run (a row at one seed) with a loss curve or a trained protocol: its loss fall and the late
    gain of each trained protocol's curve."""
    records = []
    for row in rows:
        for result in row.seeds:
            if result.loss is None and not result.late_gains:
                continue
            loss = result.loss
            records.append({"row": result.run.key, "seed": result.run.seed,
                            "loss_start": None if loss is None else loss.start,
                            "loss_end": None if loss is None else loss.end,
                            "loss_late_share": None if loss is None else loss.late_share,
                            "loss_flat": None if loss is None else loss.flat}
                           | {f"{protocol}_late_gain": gain for protocol, gain in result.late_gains.items()}
                           | {f"{protocol}_plateau": plateaued(gain) for protocol, gain in result.late_gains.items()})
    return records


def convergence_markdown(records: list[dict[str, Any]], preset: str) -> str:
    """The table.md section of the curves (empty without records)."""
    if not records:
        return ""
    trained = [protocol for protocol in ("linear", "finetune") if any(f"{protocol}_late_gain" in r for r in records)]
    titles = {"linear": "linear probe", "finetune": "fine-tuning"}
    lines = ["## Convergence", "", convergence_note(preset), "",
             "| row | seed | pre-training loss, first -> last tenth | share of the fall in the last fifth | "
             + "".join(f"{titles[protocol]}: late gain (points) | " for protocol in trained),
             "| --- | --- | --- | --- | " + "--- | " * len(trained)]
    for record in records:
        if record["loss_start"] is None:
            loss, share = "-", "-"
        else:
            loss = f"{record['loss_start']:.4g} -> {record['loss_end']:.4g}"
            share = "did not fall" if record["loss_late_share"] is None else \
                f"{record['loss_late_share']:.1%} ({'flat' if record['loss_flat'] else 'still falling'})"
        gains = []
        for protocol in trained:
            gain = record.get(f"{protocol}_late_gain", "-")
            gains.append("-" if gain == "-" else "unknown (under 4 validated epochs)" if gain is None else
                         f"{gain:+.2f} ({'plateau' if record[f'{protocol}_plateau'] else 'still rising'})")
        lines.append(f"| {record['row']} | {record['seed']} | {loss} | {share} | " + "".join(f"{g} | " for g in gains))
    return "\n".join(line.rstrip() for line in lines) + "\n"


__all__ = ["FLAT_SHARE", "GATED_PRESETS", "LOSS_TAG", "NOT_CONVERGED", "PLATEAU_POINTS", "LossFall",
           "convergence_markdown", "convergence_note", "convergence_records", "logged_scalars", "loss_fall", "plateaued"]
