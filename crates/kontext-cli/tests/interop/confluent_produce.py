"""Produce one CloudEvents binary-mode record with Confluent's Python client (confluent-kafka).

Usage: confluent_produce.py BOOTSTRAP TOPIC KEY VALUE_JSON HEADER=VALUE...
Prints {"partition": P, "offset": O} of the acknowledged record.

The producer uses librdkafka's murmur2_random partitioner, the Java-compatible one: without it
librdkafka's default (crc32-based) would put the key in a different partition than Java
producers and kontext do.
"""

import json
import sys

from confluent_kafka import Producer


def main() -> int:
    bootstrap, topic, key, value, *headers = sys.argv[1:]
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "partitioner": "murmur2_random",
        }
    )
    result = {}

    def delivered(err, msg):
        if err is not None:
            result["error"] = str(err)
        else:
            result["partition"] = msg.partition()
            result["offset"] = msg.offset()

    producer.produce(
        topic,
        key=key.encode(),
        value=value.encode(),
        headers=[tuple(h.split("=", 1)) for h in headers],
        on_delivery=delivered,
    )
    producer.flush(30)
    print(json.dumps(result))
    return 0 if "partition" in result else 1


if __name__ == "__main__":
    sys.exit(main())
