"""Data: CLIP tokenizer, shards, sources, transforms and the grain pipeline."""
