"""The network and its checkpoints.

- `rnn`: the character-level recurrent network (Embedding -> [Dropout -> GRU/LSTM] x N -> Linear)
- `checkpoint`: save and load weights, optimizer, RNG and run state (safetensors + JSON, never pickle);
  the one resolver of a model to load (`resolve_model`)

May import: torch, safetensors, `model.data` (the vocabulary), `model.store`.
"""
