"""Everything cluster-shaped: spec validation, Ray Tune sweeps, Optuna boundary search, MLflow
tracking, export and the ``ablate`` CLI. See shared DESIGN.md."""
