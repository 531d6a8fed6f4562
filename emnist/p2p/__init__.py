"""Peer-to-peer training: peers exchange gradients over a broker (Redis Streams, RabbitMQ),
computing them locally or with the emnist-grad function; partitions, compression, metrics."""
