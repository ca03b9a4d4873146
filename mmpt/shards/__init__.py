"""WebDataset shards: writing, indexing, building from raw files and inspecting."""

from mmpt.shards.index import INDEX_NAME, ShardIndex, load_index
from mmpt.shards.writer import ShardWriter

__all__ = ["INDEX_NAME", "ShardIndex", "ShardWriter", "load_index"]
