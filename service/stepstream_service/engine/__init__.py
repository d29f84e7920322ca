"""The training engine: Keras and nothing of gRPC or the store."""
