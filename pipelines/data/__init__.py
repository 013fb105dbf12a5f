"""The data path: sources (files, shards), the Ray Data stream, the tokenized cache, and micro-batches.

``batching`` is Ray-free (the training recipe uses it); the others build Ray Data datasets.
"""
