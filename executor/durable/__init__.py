"""Durable runs' machinery: the dispatch work queue shared by all executors, and taking runs up
from it (claims, poison runs, failed take-ups, dead letters)."""
