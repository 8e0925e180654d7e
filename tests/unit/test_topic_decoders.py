"""consumer.decoding.topics: which decoder reads which topic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from consumer import App, ConfigError, DecodeError, Table, encode_single_object
from consumer.decoding.topics import DecodeSettings, TopicDecoders
from schemas import examples_dir

EVENTS = Table(name="events", columns={"id": "text"}, key=("id",))
V1 = json.loads((examples_dir() / "orders-v1.avsc").read_text())
ORDER = {"order_id": "o1", "customer": "c", "amount_cents": 5, "status": "paid", "coupon": None}


def test_one_decoder_for_every_topic() -> None:
    decoders = TopicDecoders(App(name="a", tables=(EVENTS,), decode="json"))
    assert decoders.for_topic("x")(b'{"id": "1"}') == {"id": "1"}
    assert decoders.for_topic("y") is decoders.for_topic("x"), "built once, shared"


def test_a_mapping_names_a_decoder_per_topic_and_settings_override_it() -> None:
    app = App(name="a", tables=(EVENTS,), decode={"raw": "bytes", "text": "utf8"})
    decoders = TopicDecoders(app, DecodeSettings(decode={"text": "json"}))

    assert decoders.for_topic("raw")(b"\x00") == b"\x00"
    assert decoders.name_for("text") == "json"
    with pytest.raises(DecodeError):
        decoders.for_topic("text")(b"not json")


def test_a_topic_without_a_decoder_is_refused_at_start_up() -> None:
    decoders = TopicDecoders(App(name="a", tables=(EVENTS,), decode={"raw": "bytes"}))
    with pytest.raises(ConfigError, match="no decoder for this topic") as caught:
        decoders.check(["raw", "other"])
    assert caught.value.context["topic"] == "other"


def test_a_reader_schema_on_a_non_avro_topic_is_refused() -> None:
    app = App(name="a", tables=(EVENTS,), decode="json", reader_schema="orders-v2.avsc")
    with pytest.raises(ConfigError, match="Avro decoding only"):
        TopicDecoders(app).check(["orders"])


def test_avro_local_reads_older_records_as_the_reader_schema(tmp_path: Path) -> None:
    app = App(name="a", tables=(EVENTS,), decode="avro-local")
    settings = DecodeSettings(
        schema_dir=str(examples_dir()),
        reader_schema={"orders": str(examples_dir() / "orders-v2.avsc")},
    )
    decoders = TopicDecoders(app, settings)

    as_v2 = decoders.for_topic("orders")(encode_single_object(V1, ORDER))
    as_written = decoders.for_topic("audit")(encode_single_object(V1, ORDER))

    assert as_v2["currency"] == "EUR"
    assert "coupon" not in as_v2
    assert as_written == ORDER
