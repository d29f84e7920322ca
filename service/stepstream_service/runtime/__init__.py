"""What runs: the server and its supervisor, the workers, the event tail, the metrics."""
