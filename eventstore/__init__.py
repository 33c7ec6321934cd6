"""The domain: agents, conversations and runs as event-sourced aggregates, the state machine that
decides a run's next step, and the read models projected from the events."""
