"""MLflow: runs, the model registry, loss-curve plots, and provenance tags."""
