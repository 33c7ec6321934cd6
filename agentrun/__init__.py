"""agentrun: executes LLM agent runs for other programs over gRPC.

This package holds what the gateway and executor share (settings, errors, gRPC and NATS
plumbing), the generated API (agentrun.v1) and the command line (agentrun.cli).
"""
