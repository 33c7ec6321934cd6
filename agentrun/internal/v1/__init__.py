"""Generated from protos/agentrun/internal/v1 by `make proto`. Do not edit."""
