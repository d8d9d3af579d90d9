"""One run in MLflow: provenance (commit, dirty tree, secrets), the run's lifecycle, what it
logs (schema.py), its artifacts and GPU statistics."""
