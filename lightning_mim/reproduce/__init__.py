"""`lightning-mim reproduce <paper>` and `lightning-mim compare`: papers' table rows as resumable stages (pre-training,
then `lightning-mim evaluate`) and the tables they write. See `driver` for running the stages, `plan` and `state` for
what a stage is and the record of its runs, `presets` for the smoke / demo / paper scales, `papers` for the rows and
reported numbers, `tables` for the outputs."""
from lightning_mim.reproduce.driver import main, main_compare

__all__ = ["main", "main_compare"]
