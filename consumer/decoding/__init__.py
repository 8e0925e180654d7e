"""Decoding record values: JSON, UTF-8, bytes and Avro (registry or local schemas), chosen
per topic."""
