"""What client and service share: the job spec and its JSON Schema, names, job states,
failures, events, and the one codec of each for the store and the wire."""
