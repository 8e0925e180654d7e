"""Produce sample order events (JSON) to a topic, for the demo. Usage: sample_orders.py BOOTSTRAP TOPIC COUNT"""

from __future__ import annotations

import json
import random
import sys

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

STATUSES = ("created", "paid", "shipped", "delivered")


def main() -> None:
    bootstrap, topic, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    admin = AdminClient({"bootstrap.servers": bootstrap})
    if topic not in admin.list_topics(timeout=10).topics:
        admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(30)
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    rng = random.Random(7)
    orders = max(count // 4, 1)
    # Every order moves through its statuses in order; the sink keeps the last one per order_id.
    for i in range(count):
        order_id = f"order-{i % orders:05d}"
        event = {
            "order_id": order_id,
            "customer": f"customer-{rng.randrange(50):02d}",
            "amount_cents": rng.randrange(100, 100_000),
            "status": STATUSES[min(i // orders, len(STATUSES) - 1)],
        }
        producer.produce(topic, key=order_id.encode(), value=json.dumps(event).encode())
        producer.poll(0)
    producer.flush(30)
    print(f"produced {count} order events for {orders} orders to {topic}", file=sys.stderr)


if __name__ == "__main__":
    main()
