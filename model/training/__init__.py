"""The one training loop, for pretraining and fine-tuning.

- `loop`: `train()`, a typed Session and small named steps (start, resume, train_step, validate, save)
- `distributed`: several processes: DDP ranks under torchrun, launched, watched and ended by `launch()`
- `progress`: the live progress line in an interactive terminal
- `overrides`: the one `--set dotted.key=value` parser
- `processes`: processes named by PID and start time (ranks, a sweep's trials)
- `sweep`: hyperparameter sweeps: the search space, the Optuna study and the pruning hook (may import optuna, matplotlib)

May import: torch, numpy, `model.network`, `model.data`.
"""
