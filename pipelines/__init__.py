"""Sweeps and resource reports over the RECAST pipeline (paper Figs. 3 and 7, Table 5).

Drivers, not library code: they read a small YAML per sweep, run its trials as a Ray Tune
experiment (``pipelines.sweep``: grid search, or random search with ASHA for ``hpo``), log to
MLflow through ``stages.tracking`` and write tables and plots under ``outputs/sweeps/<sweep>/``::

    python -m pipelines.sweep --sweep gn --config pipelines/configs/gn.yaml
    python -m pipelines.resources --config pipelines/configs/resources.yaml [--paper-archs]
"""
