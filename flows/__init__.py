"""Prefect flows: one per pipeline stage, and the whole pipeline (servable on a schedule)."""
