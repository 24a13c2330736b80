"""Text generation from a trained network: carried state, batched sampling, top-k/top-p, greedy, beam search.

- `sampling`: `generate()` and the re-feeding baseline used by the benchmark

May import: torch, numpy, `model.network`, `model.data`.
"""
