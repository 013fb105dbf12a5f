"""`ift sweep`: Ray Tune searches over the training config (see ``tune.sweep``)."""
