"""Vision-to-LLM connectors: (B, N, vision_dim) patch features -> (B, M, llm_dim) LLM tokens.

The speech adapter (:mod:`.speech`) is the audio counterpart: frames -> fewer LLM tokens.

Every connector takes ``(vision_dim, llm_dim, ...)`` plain typed arguments (so YAML picks one by
``class_path``) and shares one contract:

- ``forward(features, grid=None)``: features (B, N, vision_dim) are row-major patch tokens with
  no CLS/register tokens; ``grid=(h, w)`` gives the grid when it is not square.
- ``num_output_tokens(num_input_tokens, grid=None) -> int``: M, known before encoding, so the
  data side can budget sequence lengths.
"""

from mmpt.models.connectors.avgpool import AvgPoolMLP
from mmpt.models.connectors.downsample import MLPDownsample, merge_2x2, patch_grid
from mmpt.models.connectors.mlp import MLP2xGelu
from mmpt.models.connectors.perceiver import PerceiverResampler
from mmpt.models.connectors.speech import SpeechAdapter
from mmpt.models.connectors.tokens import ConnectorTokens

__all__ = [
    "AvgPoolMLP",
    "ConnectorTokens",
    "MLP2xGelu",
    "MLPDownsample",
    "PerceiverResampler",
    "SpeechAdapter",
    "merge_2x2",
    "patch_grid",
]
