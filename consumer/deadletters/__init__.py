"""Dead letters: the Kafka dead-letter topic writer, and reading and re-driving it."""
