"""What operators see: structured logs and Prometheus metrics."""
