"""The Ray-free training core: the recipe every worker runs, its loop, methods, model building and export.

Nothing here imports Ray (``tests/test_library_boundaries.py`` checks it): Ray Train adapts to the recipe
in :mod:`pipelines.orchestration.worker`.
"""
