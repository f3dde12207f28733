#!/usr/bin/env python3
"""Reads Kafka records as kcat prints them (kcat -C -J: one JSON object a line, headers as a flat
[name, value, ...] list) and parses each with the CloudEvents Python SDK's Kafka binding (binary mode), a reader
no one on this project wrote. Prints one JSON object a line: the event's attributes and its data, or
{"error": ...} for a record the SDK refuses. Used by the tests (CloudEventsTests)."""
import json
import sys

from cloudevents.kafka import KafkaMessage, from_binary

for line in sys.stdin:
    line = line.strip()
    if not line:
        continue
    record = json.loads(line)
    flat = record.get("headers") or []
    headers = {flat[i]: (flat[i + 1] or "").encode() for i in range(0, len(flat), 2)}
    message = KafkaMessage(
        headers=headers,
        key=(record.get("key") or "").encode(),
        value=(record.get("payload") or "").encode(),
    )
    try:
        event = from_binary(message, data_unmarshaller=lambda data: json.loads(data))
    except Exception as error:  # the SDK's refusal is the finding
        print(json.dumps({"error": str(error), "offset": record.get("offset")}))
        continue
    attributes = {name: str(value) for name, value in event.get_attributes().items()}
    print(json.dumps({"attributes": attributes, "data": event.get_data(), "key": record.get("key")}))
