"""`ift sweep`: Ray Tune searches over the training config.

``tune.config`` (sweep files, loading, checks), ``tune.trials`` (the Tuner and its
trials), ``tune.tracking`` (MLflow runs, the champion), ``tune.results`` (rows, CSV,
heatmap, summary), ``tune.placement_groups`` (a Ray workaround), ``tune.cli`` (the
command).
"""
