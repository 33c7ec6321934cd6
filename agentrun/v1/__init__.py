"""Generated from protos/agentrun/v1 by `make proto`. Do not edit."""
