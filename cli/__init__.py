"""The agentrun command line."""
