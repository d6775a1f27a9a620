"""MLflow (rank 0 only): runs, lineage tags, the model registry and the promotion gate."""
