"""Throughput, memory, FLOP and data-pipeline benchmarks of the MIM methods (`python -m benchmarks.bench`)."""
