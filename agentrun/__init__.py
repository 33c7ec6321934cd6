"""The contract's generated code (from protos/ by `make proto`; never edited): agentrun.v1,
the public API, and agentrun.internal.v1, between gateways and executors."""
