"""arrange_crops: AnyRes tiles stitched into one canvas with a row-end token per canvas row."""

from __future__ import annotations

import pytest
import torch

from mmpt.batch import ImageLayout
from mmpt.models.connectors.anyres import arrange_crops


def test_canvas_rows_and_row_end_tokens_by_hand() -> None:
    # a global view (1 token) and 2 x 2 tiles of 1 x 2 token grids, D = 1: values name tokens
    crops = [torch.tensor([[9.0]])] + [torch.tensor([[10.0 * t], [10.0 * t + 1]]) for t in range(4)]
    layout = ImageLayout(crops=[(0, i) for i in range(5)], grids=[(1, 1)] + [(1, 2)] * 4,
                         row_end_tokens=2, tiles=(2, 2), global_view=True)  # fmt: skip
    out = arrange_crops(crops, layout, torch.tensor([-1.0]))
    # row 0: tile 0 then tile 1, a row end; row 1: tiles 2 and 3, a row end
    assert out.squeeze(1).tolist() == [9, 0, 1, 10, 11, -1, 20, 21, 30, 31, -1]


def test_plain_crops_are_concatenated_and_bad_layouts_refused() -> None:
    crops = [torch.ones(2, 3), torch.zeros(1, 3)]
    plain = ImageLayout(crops=[(0, 0), (0, 1)], grids=[(1, 2), (1, 1)])
    assert torch.equal(arrange_crops(crops, plain, None), torch.cat(crops))
    tiled = ImageLayout(crops=[(0, 0), (0, 1)], grids=[(1, 1)] * 2, row_end_tokens=1, tiles=(1, 2))
    with pytest.raises(ValueError, match="no image_newline"):
        arrange_crops([torch.ones(1, 3)] * 2, tiled, None)
    wrong = ImageLayout(crops=[(0, 0), (0, 1)], grids=[(1, 1)] * 2, row_end_tokens=3, tiles=(1, 2))
    with pytest.raises(ValueError, match="3 row-end tokens for 1 x 1 rows"):
        arrange_crops([torch.ones(1, 3)] * 2, wrong, torch.zeros(3))
