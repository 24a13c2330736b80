"""Evaluation and the report: bits per character on held-out text, loss curves, the markdown report.

- `scores`: `bits_per_char()` (each token scored once, per character of the text it covers, whatever the tokenizer),
  `plot_losses()`, `render_report()`

May import: matplotlib, `model.training` (evaluate), `model.network`, `model.data`.
"""
