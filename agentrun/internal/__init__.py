"""Generated from protos/agentrun/internal by `make proto`. Do not edit."""
