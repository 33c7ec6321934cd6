"""The executor's gRPC services: they translate between the API's messages and the use cases,
and nothing else. The tenant of every call is the one its gateway names in the call metadata."""
