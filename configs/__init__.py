"""Experiment configs (ml_collections); one file per method, shared `base`."""
