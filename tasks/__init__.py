"""Prefect tasks: thin wrappers over radonc_backup that add retries, names and load limits."""
