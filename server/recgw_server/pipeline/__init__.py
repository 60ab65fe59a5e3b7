"""The upload pipeline: from streams of chunks to one object. Knows nothing of gRPC."""
