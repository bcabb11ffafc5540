"""The path of a request: a model's runtime across its replicas, and each replica's FIFO queue."""
