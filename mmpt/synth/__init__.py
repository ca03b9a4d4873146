"""Deterministic, learnable synthetic datasets written as mmpt shards."""
