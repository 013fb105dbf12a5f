"""Experiments outside the training pipeline (optional extras)."""
