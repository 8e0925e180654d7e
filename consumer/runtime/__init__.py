"""Operating a running consumer: metrics, health, the ops HTTP server, lag sampling,
graceful shutdown and logging."""
