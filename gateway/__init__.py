"""The gateway: the public gRPC edge (auth, validation, routing, stream relay).

It holds no run state: any gateway serves any run."""
