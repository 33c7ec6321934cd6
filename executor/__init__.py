"""The executor: runs agents (the agent loop, model providers, tools) behind ExecutorService."""
