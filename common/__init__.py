"""What the gateway and the executor share: settings, typed errors, and the gRPC and NATS
plumbing."""
