"""Async inference jobs: a durable queue (SQLite or Redis Streams), workers that run each
job through the InferenceService at lower priority, and signed callbacks."""
