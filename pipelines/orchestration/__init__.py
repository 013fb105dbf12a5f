"""The Ray side: the ``ift train`` driver, the Ray Train worker entry, checkpoint storage, the run's
progress actor and the test hooks."""
