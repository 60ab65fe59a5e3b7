"""The gRPC layer: turns messages into pipeline calls and errors into status codes."""
