"""Everything cluster-shaped: spec validation, Ray Tune sweeps, Optuna boundary search, MLflow
tracking, the analysis (``runs`` -> ``tables`` / ``figures`` -> ``forensics``, ``report``) and the
``ablate`` CLI. See shared DESIGN.md."""
