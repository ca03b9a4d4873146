"""Data curation over shards: deduplicate and filter by score tables (``mmpt data dedup|filter``).

Score tables are parquet files keyed by ``shard`` (the shard's file name) and ``key`` (the
sample's ``__key__``), one column per score; any number of them join on those two columns.
"""
