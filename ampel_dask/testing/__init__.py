"""Real servers for tests and local runs: a Kafka-protocol broker and a MongoDB-wire-protocol server."""
