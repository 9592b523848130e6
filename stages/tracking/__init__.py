"""tracking: MLflow parent and child runs, the store lock and retry, the payload registry and its CLI, lineage."""
