"""Operating a running consumer: metrics, health, the ops HTTP server, lag sampling,
graceful shutdown and logging; and the supervisor that runs several members of a group as
worker processes (`run --workers N`) with one endpoint for all of them."""
