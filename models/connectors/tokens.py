"""Token counts of a connector without its weights, for the data workers."""

from __future__ import annotations

import copy

from torch import nn


class ConnectorTokens:
    """Picklable ``(h, w) -> tokens`` of a connector, for the data workers (no weights)."""

    def __init__(self, connector: nn.Module) -> None:
        self.connector = copy.deepcopy(connector).to("meta")

    def __call__(self, grid: tuple[int, int]) -> int:
        """Connector output tokens for one crop whose patch grid is ``grid``."""
        return int(self.connector.num_output_tokens(grid[0] * grid[1], tuple(grid)))
