"""Performance benchmarks for IFT: ``python -m benchmarks.run`` (see benchmarks/README.md).

Importing this package imports nothing heavy; each benchmark module imports what
it needs.  ``benchmarks.step_time`` and ``benchmarks.scan`` never import Ray, so
they run on a GPU box that has only torch, transformers and DeepSpeed.
"""
