"""The agentrun console: a web application that is only a gRPC client of a gateway."""
