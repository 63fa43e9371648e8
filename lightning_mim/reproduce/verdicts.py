"""Each paper's claims, as its spec states them, judged on a table's numbers: for each claim "A > B" and protocol,
holds, reversed, within noise (see `stats`), n = 1 (no verdict), or why there is nothing to judge (a row or protocol
this table did not run, a result missing from results.csv). `compare` judges every paper's claims on its rows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lightning_mim.reproduce.convergence import NOT_CONVERGED
from lightning_mim.reproduce.papers import PAPERS, Row
from lightning_mim.reproduce.plan import Plan
from lightning_mim.reproduce.results import RowResult, is_accuracy, protocol_name
from lightning_mim.reproduce.stats import NO_RESULT, Summary, judge, shown_summary

NOT_RUN = "not run"
# Beyond Masking's ranking of its objectives (beyond_masking.md section 4): (a)+(m) > (m) > (a) > (b) > (c) > (d) > (e).
BEYOND_MASKING_ORDER = ("bm_zoom_in_masking", "bm_masking", "bm_zoom_in", "bm_zoom_out", "bm_distortion", "bm_blur",
                        "bm_decolorize")


@dataclass(frozen=True)
class Claim:
    """"`better` > `worse`": two rows of the paper's table (paper-scale row keys)."""

    paper: str
    better: str
    worse: str

    def rows(self) -> tuple[Row, Row]:
        rows = {row.key: row for row in PAPERS[self.paper].rows}
        return rows[self.better], rows[self.worse]

    @property
    def label(self) -> str:
        better, worse = self.rows()
        if self.paper == "beyond_masking":  # one method: the objectives by their letters in the paper
            return f"{better.backbone.split(' ', 1)[1]} > {worse.backbone.split(' ', 1)[1]}"
        if self.paper == "mapet":
            return f"{better.method} > the BEiT-style baseline (same tokenizer)"
        return f"{better.method} > {worse.method}"


CLAIMS: dict[str, tuple[Claim, ...]] = {
    "lut": (Claim("lut", "lut_vit_b16", "mae_vit_b16"),),
    "symmim": (Claim("symmim", "symmim_vit_b16", "simmim_vit_b16"),),
    "mapet": tuple(Claim("mapet", f"mapet_vit_b16_{tokenizer}", f"beit_vit_b16_{tokenizer}")
                   for tokenizer in ("vqkd", "kclip")),
    "beyond_masking": tuple(Claim("beyond_masking", better, worse)
                            for better, worse in zip(BEYOND_MASKING_ORDER, BEYOND_MASKING_ORDER[1:])),
}


def run_key(plan: Plan, row: Row) -> str:
    """The key of the plan's run that stands for a paper row: the row itself at paper scale, its demo row otherwise
    (`compare` names its paper-scale runs compare_<demo row>)."""
    if plan.name == "compare":
        return f"compare_{row.demo_key}" if plan.setup.preset == "paper" else row.demo_key
    return row.key if plan.setup.preset == "paper" else row.demo_key


def claims_of(plan: Plan) -> list[tuple[Claim, str, str]]:
    """(claim, better run key, worse run key) for each claim the plan can speak to, once per pair of runs (MaPeT's
    two tokenizers share one demo pair)."""
    claims = [claim for claims in CLAIMS.values() for claim in claims] if plan.name == "compare" else \
        list(CLAIMS.get(plan.name, ()))
    pairs: dict[tuple[str, str], Claim] = {}
    for claim in claims:
        better, worse = claim.rows()
        pairs.setdefault((run_key(plan, better), run_key(plan, worse)), claim)
    return [(claim, better, worse) for (better, worse), claim in pairs.items()]


def side(row: RowResult | None, protocol: str) -> Summary | str:
    if row is None or protocol not in row.run.protocols:
        return NOT_RUN
    return row.summary(protocol) if row.converged(protocol) else NOT_CONVERGED


def pretraining_claims(rows: list[RowResult]) -> list[tuple[str, str, str]]:
    """(label, pre-trained row, its random-init row) for each row that has both: did pre-training help?"""
    keys = {row.run.key for row in rows}
    return [(f"{row.run.method} pre-training > its random init", row.run.key, f"{row.run.key}_random_init")
            for row in rows if row.run.reference is None and f"{row.run.key}_random_init" in keys]


def verdict_records(plan: Plan, rows: list[RowResult]) -> list[dict[str, Any]]:
    """One record per claim and protocol of the table: the paper's claims that concern a row of it (a claim whose
    rows the table does not hold at all, e.g. `compare --rows mae,lut`'s MaPeT claim, is left out), then pre-training
    against random initialisation for every row, on the protocols the random-init row runs."""
    by_key = {row.run.key: row for row in rows}
    records = []
    claims = [(claim.label, better, worse, plan.protocols) for claim, better, worse in claims_of(plan)
              if better in by_key or worse in by_key]
    claims += [(label, better, worse, by_key[worse].run.protocols)
               for label, better, worse in pretraining_claims(rows)]
    for label, better_key, worse_key, protocols in claims:
        for protocol in (protocol for protocol in plan.protocols if is_accuracy(protocol) and protocol in protocols):
            better, worse = side(by_key.get(better_key), protocol), side(by_key.get(worse_key), protocol)
            record: dict[str, Any] = {"claim": label, "better_row": better_key, "worse_row": worse_key,
                                      "protocol": protocol}
            for name, summary in (("better", better), ("worse", worse)):
                numbers = summary if isinstance(summary, Summary) else Summary(None, None, 0)
                record |= {f"{name}_mean": numbers.mean, f"{name}_std": numbers.std, f"{name}_n": numbers.n}
            if isinstance(better, str) or isinstance(worse, str):
                reason = better if isinstance(better, str) else worse
                record |= {"difference": None, "two_se": None, "verdict": reason}
            else:
                verdict = judge(better, worse)
                record |= {"difference": verdict.difference, "two_se": verdict.noise, "verdict": verdict.verdict}
            records.append(record)
    return records


def verdicts_markdown(records: list[dict[str, Any]]) -> str:
    """The table.md section of the verdicts (empty without claims)."""
    if not records:
        return ""

    lines = ["## Verdicts", "",
             "Each claim of the paper(s) (as the spec in ../shared/methods/ states it) on this table's numbers, per "
             "protocol: holds (or "
             "reversed) when the first row's mean top-1 exceeds the second's (or falls below it) by at least twice "
             "the pooled standard error 2 SE = 2 sqrt(s1^2/n1 + s2^2/n2); within noise when the difference is "
             "smaller; with n = 1 on either side there is no spread, so no verdict (SEEDS=N runs N seeds); "
             f"{NO_RESULT}: a run without that result; {NOT_RUN}: a row or protocol this table does not run; "
             f"{NOT_CONVERGED}: a seed's validation curve still rising (see Convergence).", "",
             "| claim | rows | protocol | first: mean ± std (n) | second: mean ± std (n) | difference | 2 SE | "
             "verdict |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for record in records:
        summaries = [shown_summary(Summary(record[f"{name}_mean"], record[f"{name}_std"], record[f"{name}_n"]))
                     for name in ("better", "worse")]
        difference = "-" if record["difference"] is None else f"{record['difference']:+.2f}"
        two_se = "-" if record["two_se"] is None else f"{record['two_se']:.2f}"
        lines.append(f"| {record['claim']} | {record['better_row']} > {record['worse_row']} | "
                     f"{protocol_name(record['protocol'])} | {summaries[0]} | {summaries[1]} | "
                     f"{difference} | {two_se} | {record['verdict']} |")
    return "\n".join(lines) + "\n"
