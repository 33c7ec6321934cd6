"""The contract's generated code: agentrun.v1 (the public API) and agentrun.internal.v1 (between
gateways and executors), produced from protos/ by `make proto` and never edited by hand."""
