"""Hyperparameter search: search spaces, the Optuna sweep, its results (``lmforge sweep``)."""
