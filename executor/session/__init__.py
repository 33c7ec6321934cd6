"""A run's life on an executor: one session type for both execution modes, whose mode is only
which ports it holds (how the run's events are recorded, how it waits for decisions)."""
