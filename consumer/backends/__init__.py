"""Kafka client backends: confluent-kafka (librdkafka) and aiokafka (asyncio), each
implementing the engine's `ClientBackend` and `PartitionReader` contracts."""
