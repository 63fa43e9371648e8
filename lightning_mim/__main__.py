"""`python -m lightning_mim ...`: the same as `lightning-mim ...`."""
from lightning_mim.cli import main

main()
