"""Prefect tasks: thin wrappers that call the `transformer2` library and log to MLflow."""
