"""The data path: sources (files, shards), the Ray Data stream, the tokenized cache, and micro-batches.

``batching`` (the training recipe uses it) and ``check`` (``ift data check``) are Ray-free; the others build Ray
Data datasets.
"""
