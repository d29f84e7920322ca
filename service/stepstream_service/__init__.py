"""The training service: api (gRPC), store (jobs, queue, events), runtime (server, workers,
event tail, metrics) and engine (Keras), grouped by layer of the flow."""
