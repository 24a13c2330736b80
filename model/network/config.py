"""The network's architecture as a config: ModelConfig (the published recipe as defaults).

Plain pydantic, no torch at import time (model/network/rnn.py builds the network from it), so the
flows' typed config and the data stages' processes load without importing torch.

    ModelConfig(cell="lstm", hidden_sizes=[512, 512])
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt


class ModelConfig(BaseModel):
    """Architecture of the network; the defaults are the published recipe."""

    model_config = ConfigDict(extra="forbid")

    cell: Literal["gru", "lstm"] = Field("gru", description="recurrent cell type of every layer")
    embedding_dim: PositiveInt = Field(256, description="width of the character embedding")
    hidden_sizes: list[PositiveInt] = Field(
        default_factory=lambda: [256, 512, 1024, 512, 256], min_length=1,
        description="hidden size of each stacked one-layer recurrent block, bottom to top",
    )
    dropout: float = Field(0.5, ge=0.0, lt=1.0, allow_inf_nan=False, description="dropout probability before each recurrent layer")
