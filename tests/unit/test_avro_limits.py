"""consumer.decoding.avro_limits: values that would crash or swamp fastavro are refused first."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer import App, ConfigError, DecodeError, Table
from consumer.decoding.avro import (
    encode_confluent,
    encode_single_object,
    parse_schema,
    schema_fingerprint,
)
from consumer.decoding.avro_limits import (
    DEFAULT_MAX_NESTING_DEPTH,
    MAX_NESTING_DEPTH_ALLOWED,
    MAX_ZERO_WIDTH_ITEMS,
    ValueGuard,
    guard_for,
)
from consumer.decoding.decoders import DecodeOptions, Decoder, decoder_for
from consumer.decoding.topics import DecodeSettings, TopicDecoders
from tests.fixtures.hostile_avro import NODE, avro_long, node_list, node_list_body
from tests.fixtures.schema_registry import FakeSchemaRegistry

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "schemas" / "examples"
HOSTILE_DEPTH = 20_000  # 40 KB; fastavro's C reader overflows an 8 MiB stack on it (SIGSEGV)
NODE_HEADER = b"\xc3\x01" + schema_fingerprint(parse_schema(NODE))


def write_schema(directory: Path, name: str, schema: Any) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(schema))
    return path


@pytest.fixture
def node_dir(tmp_path: Path) -> Path:
    write_schema(tmp_path / "schemas", "node.avsc", NODE)
    return tmp_path / "schemas"


@pytest.fixture
def registry() -> Iterator[FakeSchemaRegistry]:
    with FakeSchemaRegistry() as fake:
        yield fake


def local(schema_dir: Path, **options: Any) -> Decoder:
    return decoder_for("avro-local", DecodeOptions(schema_dir=schema_dir, **options))


# --- nesting depth ---------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 40, DEFAULT_MAX_NESTING_DEPTH])
def test_a_value_at_the_depth_limit_decodes_and_one_level_more_is_refused(
    node_dir: Path, registry: FakeSchemaRegistry, limit: int
) -> None:
    schema_id = registry.register("nodes-value", NODE)
    by_registry = decoder_for(
        "avro", DecodeOptions(schema_registry_url=registry.url, max_nesting_depth=limit)
    )
    by_dir = local(node_dir, max_nesting_depth=limit)
    at_limit = node_list(limit)
    assert by_dir(encode_single_object(NODE, at_limit)) == at_limit
    assert by_registry(encode_confluent(NODE, schema_id, at_limit)) == at_limit
    deeper = node_list(limit + 1)
    for decode, value in (
        (by_dir, encode_single_object(NODE, deeper)),
        (by_registry, encode_confluent(NODE, schema_id, deeper)),
    ):
        with pytest.raises(DecodeError, match=f"nests deeper than {limit} levels") as caught:
            decode(value)
        assert caught.value.field == "nesting depth"
        assert "max_nesting_depth" in str(caught.value)


def test_the_default_limit_is_the_documented_one(node_dir: Path) -> None:
    assert DEFAULT_MAX_NESTING_DEPTH == 256
    decode = local(node_dir)
    assert decode(NODE_HEADER + node_list_body(256)) == node_list(256)
    with pytest.raises(DecodeError, match="nests deeper than 256 levels"):
        decode(NODE_HEADER + node_list_body(257))


def test_the_limit_holds_when_a_reader_schema_skips_the_recursive_field(node_dir: Path) -> None:
    # Resolution skips the writer's `next`; fastavro's skip recurses just like its read.
    flat = {**NODE, "fields": [NODE["fields"][0]]}
    reader = write_schema(node_dir.parent, "flat.avsc", flat)
    decode = local(node_dir, reader_schema=reader, max_nesting_depth=10)
    assert decode(NODE_HEADER + node_list_body(10)) == {"value": 0}
    with pytest.raises(DecodeError) as caught:
        decode(NODE_HEADER + node_list_body(11))
    assert caught.value.field == "nesting depth"


_HOSTILE_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys, threading
    from pathlib import Path
    from consumer import DecodeError
    from consumer.decoding.avro import encode_confluent
    from consumer.decoding.avro_limits import DEFAULT_MAX_NESTING_DEPTH, MAX_NESTING_DEPTH_ALLOWED
    from consumer.decoding.decoders import DecodeOptions, decoder_for
    from tests.fixtures.hostile_avro import NODE, node_list_body
    from tests.fixtures.schema_registry import FakeSchemaRegistry

    schema_dir, header, depth = Path(sys.argv[1]), bytes.fromhex(sys.argv[2]), int(sys.argv[3])
    results = {}

    def attempt(name, decode, value):
        try:
            decode(value)
            results[name] = "decoded"
        except DecodeError as exc:
            results[name] = exc.field

    with FakeSchemaRegistry() as registry:
        schema_id = registry.register("nodes-value", NODE)
        by_registry = decoder_for("avro", DecodeOptions(schema_registry_url=registry.url))
        by_dir = decoder_for("avro-local", DecodeOptions(schema_dir=schema_dir))
        at_max = decoder_for(
            "avro-local",
            DecodeOptions(schema_dir=schema_dir, max_nesting_depth=MAX_NESTING_DEPTH_ALLOWED),
        )
        hostile = node_list_body(depth)
        confluent = b"\\x00" + schema_id.to_bytes(4, "big") + hostile
        attempt("avro-local", by_dir, header + hostile)
        attempt("avro", by_registry, confluent)
        # The aiokafka backend decodes in asyncio.to_thread workers (default thread stack).
        asyncio.run(asyncio.to_thread(attempt, "avro-local, to_thread", by_dir, header + hostile))
        deepest = header + node_list_body(MAX_NESTING_DEPTH_ALLOWED)
        attempt("at the highest limit allowed", at_max, deepest)
        # A small thread stack (1 MiB, as Alpine's Python gives its threads): the default holds.
        threading.stack_size(1 << 20)
        small = threading.Thread(
            target=lambda: (
                attempt("1 MiB thread, hostile", by_dir, header + hostile),
                attempt("1 MiB thread, default depth", by_dir,
                        header + node_list_body(DEFAULT_MAX_NESTING_DEPTH)),
            )
        )
        small.start()
        small.join()
    print(json.dumps(results))
    """
)


def test_a_20000_deep_value_is_refused_without_crashing_the_process(node_dir: Path) -> None:
    """In a child process: a crash (SIGSEGV) shows as its exit code, not as pytest dying. The
    same script against the decoders before the guard dies with -11 at the first decode."""
    done = subprocess.run(
        [sys.executable, "-c", _HOSTILE_SCRIPT, str(node_dir), NODE_HEADER.hex(),
         str(HOSTILE_DEPTH)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert json.loads(done.stdout.splitlines()[-1]) == {
        "avro-local": "nesting depth",
        "avro": "nesting depth",
        "avro-local, to_thread": "nesting depth",
        "at the highest limit allowed": "decoded",
        "1 MiB thread, hostile": "nesting depth",
        "1 MiB thread, default depth": "decoded",
    }


def test_a_hostile_value_is_refused_quickly(node_dir: Path) -> None:
    decode = local(node_dir)
    value = NODE_HEADER + node_list_body(HOSTILE_DEPTH)
    started = time.perf_counter()
    with pytest.raises(DecodeError) as caught:
        decode(value)
    assert time.perf_counter() - started < 0.5, "refused at level 257, not after 20,000"
    assert caught.value.field == "nesting depth"
    # Where node 257 starts: 256 nodes were read, not one more.
    assert f"at byte {len(NODE_HEADER + node_list_body(256))})" in str(caught.value)


def test_a_non_recursive_schema_nested_past_the_limit_is_guarded_too(tmp_path: Path) -> None:
    inner = {"type": "record", "name": "C", "fields": [{"name": "n", "type": "long"}]}
    middle = {"type": "record", "name": "B", "fields": [{"name": "c", "type": inner}]}
    outer = {"type": "record", "name": "A", "fields": [{"name": "bs", "type": {"type": "array",
             "items": middle}}]}  # fmt: skip
    write_schema(tmp_path, "a.avsc", outer)
    value = {"bs": [{"c": {"n": 1}}, {"c": {"n": 2}}]}
    assert local(tmp_path, max_nesting_depth=4)(encode_single_object(outer, value)) == value
    with pytest.raises(DecodeError) as caught:  # A, its array, B, C: 4 levels
        local(tmp_path, max_nesting_depth=3)(encode_single_object(outer, value))
    assert caught.value.field == "nesting depth"
    # An empty array never reaches B and C.
    assert local(tmp_path, max_nesting_depth=3)(encode_single_object(outer, {"bs": []})) == {
        "bs": []
    }


# --- the hot path: schemas that cannot nest past the limit are not walked ---------------------


def test_values_of_non_recursive_schemas_are_not_walked(
    monkeypatch: pytest.MonkeyPatch, registry: FakeSchemaRegistry, node_dir: Path
) -> None:
    walked: list[int] = []
    real_check = ValueGuard.check

    def counting_check(self: ValueGuard, value: bytes, start: int) -> None:
        walked.append(len(value))
        real_check(self, value, start)

    monkeypatch.setattr(ValueGuard, "check", counting_check)
    v1 = json.loads((EXAMPLES / "orders-v1.avsc").read_text())
    order = {"order_id": "o", "customer": "c", "amount_cents": 1, "status": "s", "coupon": None}
    schema_id = registry.register("orders-value", v1)
    by_registry = decoder_for("avro", DecodeOptions(schema_registry_url=registry.url))
    by_dir = local(EXAMPLES, reader_schema=EXAMPLES / "orders-v2.avsc")
    for _ in range(100):
        assert by_registry(encode_confluent(v1, schema_id, order)) == order
        assert by_dir(encode_single_object(v1, order))["currency"] == "EUR"
    assert walked == []
    assert guard_for(parse_schema(v1), "v1", DEFAULT_MAX_NESTING_DEPTH) is None
    # A recursive schema's values are walked, once each.
    assert local(node_dir)(NODE_HEADER + node_list_body(3)) == node_list(3)
    assert walked == [len(NODE_HEADER) + 6]


# --- malformed values the walk meets: the decoders' usual messages ----------------------------


def test_malformed_values_of_a_guarded_schema(node_dir: Path) -> None:
    decode = local(node_dir)
    whole = NODE_HEADER + node_list_body(5)
    for end in range(len(NODE_HEADER), len(whole)):
        with pytest.raises(DecodeError, match=r"value truncated: not valid Avro for writer schema"):
            decode(whole[:end])
    with pytest.raises(DecodeError, match="union index 2 out of range"):
        decode(NODE_HEADER + b"\x00\x04\x00")
    with pytest.raises(DecodeError, match="union index -1 out of range"):
        decode(NODE_HEADER + b"\x00\x01\x00")
    with pytest.raises(DecodeError, match="varint longer than 10 bytes"):
        decode(NODE_HEADER + b"\xff" * 11 + b"\x00\x00")
    with pytest.raises(DecodeError, match="2 bytes left after the record"):
        decode(whole + b"\x00\x00")


def test_a_block_whose_size_disagrees_with_its_items_is_refused(tmp_path: Path) -> None:
    # fastavro reads the items of a sized block, but skips it by its size: the two would read
    # different values from the same bytes, so the walk insists they agree.
    tree = {"type": "record", "name": "T", "fields": [
        {"name": "kids", "type": {"type": "array", "items": "T"}},
        {"name": "n", "type": "long"},
    ]}  # fmt: skip
    write_schema(tmp_path, "t.avsc", tree)
    decode = local(tmp_path)
    header = b"\xc3\x01" + schema_fingerprint(parse_schema(tree))
    leaf = b"\x00" + avro_long(7)  # no kids, n = 7
    honest = avro_long(-2) + avro_long(2 * len(leaf)) + leaf + leaf + b"\x00" + avro_long(1)
    assert decode(header + honest) == {"kids": [{"kids": [], "n": 7}] * 2, "n": 1}
    lying = avro_long(-2) + avro_long(1) + leaf + leaf + b"\x00" + avro_long(1)
    with pytest.raises(DecodeError, match="does not end where its size says"):
        decode(header + lying)
    with pytest.raises(DecodeError, match="negative block size"):
        decode(header + avro_long(-2) + avro_long(-4) + leaf + leaf + b"\x00" + avro_long(1))


# --- item counts ----------------------------------------------------------------------------

EMPTY = {"type": "record", "name": "Empty", "fields": []}
NULLS = {"type": "record", "name": "Nulls", "fields": [{"name": "a", "type": "null"},
         {"name": "z", "type": {"type": "fixed", "name": "Z", "size": 0}}]}  # fmt: skip
ZERO_WIDTH_ITEMS = {
    "null": ("null", None),
    "empty record": (EMPTY, {}),
    "record of null and fixed(0)": (NULLS, {"a": None, "z": b""}),
}


def holder(items: Any) -> dict[str, Any]:
    return {"type": "record", "name": "Holder", "fields": [
        {"name": "xs", "type": {"type": "array", "items": items}},
        {"name": "n", "type": "long"},
    ]}  # fmt: skip


def holder_decoder(directory: Path, items: Any) -> tuple[Decoder, bytes]:
    schema = holder(items)
    write_schema(directory, "holder.avsc", schema)
    return local(directory), b"\xc3\x01" + schema_fingerprint(parse_schema(schema))


def decode_measured(decode: Decoder, value: bytes) -> tuple[DecodeError, float, int]:
    """The DecodeError `decode` raises, the seconds it took, the peak bytes it allocated."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(DecodeError) as caught:
            decode(value)
    finally:
        took = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return caught.value, took, peak


@pytest.mark.parametrize("kind", sorted(ZERO_WIDTH_ITEMS))
def test_huge_counts_of_zero_width_items_are_refused_at_once(tmp_path: Path, kind: str) -> None:
    decode, header = holder_decoder(tmp_path, ZERO_WIDTH_ITEMS[kind][0])
    bodies = {
        # 15 bytes once took fastavro 3 s and 540 MiB (null), 25 s and 4.6 GiB (empty records).
        "one block of 2**26": avro_long(2**26) + b"\x00" + avro_long(1),
        "a sized block": avro_long(-(2**40)) + avro_long(0) + b"\x00" + avro_long(1),
        "blocks under the cap, more than it in all": avro_long(4_000) * 3 + b"\x00" + avro_long(1),
    }
    for name, body in bodies.items():
        error, took, peak = decode_measured(decode, header + body)
        assert error.field == "item count", name
        assert "items of zero width, past the 10000 one value may hold" in str(error), name
        assert took < 0.5, (name, took)
        assert peak < 256 * 1024, (name, peak)


@pytest.mark.parametrize("kind", sorted(ZERO_WIDTH_ITEMS))
def test_zero_width_items_up_to_the_cap_decode(tmp_path: Path, kind: str) -> None:
    items, item = ZERO_WIDTH_ITEMS[kind]
    decode, header = holder_decoder(tmp_path, items)
    assert MAX_ZERO_WIDTH_ITEMS == 10_000
    full = {"xs": [item] * MAX_ZERO_WIDTH_ITEMS, "n": 3}
    assert decode(encode_single_object(holder(items), full)) == full
    split = avro_long(6_000) + avro_long(4_000) + b"\x00" + avro_long(3)
    assert decode(header + split) == full
    with pytest.raises(DecodeError) as caught:
        decode(header + avro_long(6_000) + avro_long(4_001) + b"\x00" + avro_long(3))
    assert caught.value.field == "item count"


def test_zero_width_items_are_counted_over_every_array_of_the_value(tmp_path: Path) -> None:
    # xs: an array of arrays of null.
    decode, header = holder_decoder(tmp_path, {"type": "array", "items": "null"})
    inner = avro_long(2_000) + b"\x00"  # 2,000 nulls in 2 bytes
    five = avro_long(5) + inner * 5 + b"\x00"
    assert decode(header + five + avro_long(1)) == {"xs": [[None] * 2_000] * 5, "n": 1}
    error, took, peak = decode_measured(decode, header + avro_long(6) + inner * 6 + b"\x00\x02")
    assert error.field == "item count"
    assert took < 0.5
    assert peak < 256 * 1024


def test_a_count_larger_than_the_bytes_left_is_refused_in_a_walked_value(tmp_path: Path) -> None:
    # Walked because the schema is recursive: every count is checked against the bytes left.
    tree = {"type": "record", "name": "T", "fields": [
        {"name": "kids", "type": {"type": "array", "items": "T"}},
        {"name": "tags", "type": {"type": "map", "values": "null"}},
    ]}  # fmt: skip
    write_schema(tmp_path, "t.avsc", tree)
    decode = local(tmp_path)
    header = b"\xc3\x01" + schema_fingerprint(parse_schema(tree))
    one_tag = b"\x00" + avro_long(1) + b"\x00" + b"\x00"  # no kids; tags {"": None}
    assert decode(header + one_tag) == {"kids": [], "tags": {"": None}}
    for body, what in (
        (
            avro_long(2**60) + b"\x00" * 4,
            "array in field 'kids' declares 1152921504606846976 items",
        ),
        (b"\x00" + avro_long(5) + b"\x00" * 4, "map in field 'tags' declares 5 items with 4 bytes"),
    ):
        error, took, _peak = decode_measured(decode, header + body)
        assert error.field == "item count"
        assert what in str(error)
        assert "each takes a byte at least" in str(error)
        assert took < 0.5


def test_arrays_of_items_that_take_bytes_need_no_walk(tmp_path: Path) -> None:
    # fastavro runs out of bytes before it makes more items than there are bytes.
    longs = holder("long")
    assert guard_for(parse_schema(longs), "longs", DEFAULT_MAX_NESTING_DEPTH) is None
    assert guard_for(parse_schema(holder("null")), "nulls", DEFAULT_MAX_NESTING_DEPTH) is not None
    mapped = {"type": "map", "values": "null"}  # every key takes a byte
    assert guard_for(parse_schema(mapped), "map", DEFAULT_MAX_NESTING_DEPTH) is None
    decode, header = holder_decoder(tmp_path, "long")
    error, took, peak = decode_measured(decode, header + avro_long(2**60) + b"\x02" * 8)
    assert "value truncated" in str(error)
    assert took < 0.5
    assert peak < 256 * 1024


@settings(max_examples=100, deadline=None)
@given(
    nulls=st.lists(st.none(), max_size=40),
    empties=st.lists(st.just({}), max_size=40),
    n=st.integers(-(2**63), 2**63 - 1),
)
def test_small_arrays_of_zero_width_items_round_trip(
    tmp_path_factory: pytest.TempPathFactory, nulls: list[None], empties: list[Any], n: int
) -> None:
    schema = {"type": "record", "name": "Two", "fields": [
        {"name": "nulls", "type": {"type": "array", "items": "null"}},
        {"name": "empties", "type": {"type": "array", "items": EMPTY}},
        {"name": "n", "type": "long"},
    ]}  # fmt: skip
    directory = tmp_path_factory.getbasetemp() / "two-arrays"
    if not directory.exists():
        write_schema(directory, "two.avsc", schema)
    value = {"nulls": nulls, "empties": empties, "n": n}
    assert local(directory)(encode_single_object(schema, value)) == value


# --- the setting -----------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -5, MAX_NESTING_DEPTH_ALLOWED + 1, True, "64"])
def test_an_unusable_limit_is_a_config_error(node_dir: Path, bad: Any) -> None:
    with pytest.raises(ConfigError, match="max_nesting_depth must be") as caught:
        local(node_dir, max_nesting_depth=bad)
    assert caught.value.context["setting"] == "max_nesting_depth"
    with pytest.raises(ConfigError, match="max_nesting_depth must be"):
        decoder_for(
            "avro", DecodeOptions(schema_registry_url="http://127.0.0.1:1", max_nesting_depth=bad)
        )


def test_decode_settings_carry_the_limit_to_the_topic_decoders(node_dir: Path) -> None:
    nodes = Table(name="nodes", columns={"value": "bigint"}, key=("value",))
    app = App(name="a", tables=(nodes,), decode="avro-local")
    default = TopicDecoders(app, DecodeSettings(schema_dir=str(node_dir)))
    assert default.for_topic("nodes")(NODE_HEADER + node_list_body(200)) == node_list(200)
    strict = TopicDecoders(app, DecodeSettings(schema_dir=str(node_dir), max_nesting_depth=3))
    assert strict.for_topic("nodes")(NODE_HEADER + node_list_body(3)) == node_list(3)
    with pytest.raises(DecodeError) as caught:
        strict.for_topic("nodes")(NODE_HEADER + node_list_body(4))
    assert caught.value.field == "nesting depth"


# --- property: the walk reads any value as fastavro does, and counts its levels -------------

TREE: dict[str, Any] = {
    "type": "record",
    "name": "Tree",
    "fields": [
        {"name": "name", "type": "string"},
        {"name": "flag", "type": "boolean"},
        {"name": "score", "type": "double"},
        {"name": "ratio", "type": "float"},
        {"name": "small", "type": "int"},
        {"name": "blob", "type": "bytes"},
        {"name": "tag", "type": {"type": "fixed", "name": "Tag", "size": 3}},
        {"name": "kind", "type": {"type": "enum", "name": "Kind", "symbols": ["A", "B", "C"]}},
        {"name": "nothing", "type": "null"},
        {"name": "opt", "type": ["null", "string", "long"]},
        {"name": "kids", "type": {"type": "array", "items": "Tree"}},
        {"name": "by_key", "type": {"type": "map", "values": "Tree"}},
        {"name": "next", "type": ["null", "Tree"]},
    ],
}


def _tree(children: st.SearchStrategy[Any] | None) -> st.SearchStrategy[dict[str, Any]]:
    """A Tree; with no `children`, a leaf: no kids, no values, no next."""
    kids = st.just([]) if children is None else st.lists(children, max_size=2)
    by_key = st.just({}) if children is None else st.dictionaries(st.text(max_size=2), children,
                                                                  max_size=2)  # fmt: skip
    following = st.none() if children is None else st.none() | children
    return st.fixed_dictionaries(
        {
            "name": st.text(max_size=5),
            "flag": st.booleans(),
            "score": st.floats(allow_nan=False),
            "ratio": st.floats(width=32, allow_nan=False),
            "small": st.integers(-(2**31), 2**31 - 1),
            "blob": st.binary(max_size=5),
            "tag": st.binary(min_size=3, max_size=3),
            "kind": st.sampled_from(["A", "B", "C"]),
            "nothing": st.none(),
            "opt": st.none() | st.text(max_size=3) | st.integers(-(2**63), 2**63 - 1),
            "kids": kids,
            "by_key": by_key,
            "next": following,
        }
    )


_trees = st.recursive(_tree(None), _tree, max_leaves=12)


def levels(tree: dict[str, Any]) -> int:
    """Levels fastavro nests to read `tree`: the record, and its array and map (empty or not)."""
    kids = max((levels(kid) for kid in tree["kids"]), default=0)
    values = max((levels(value) for value in tree["by_key"].values()), default=0)
    following = levels(tree["next"]) if tree["next"] is not None else 0
    return 1 + max(1 + kids, 1 + values, following)


@pytest.fixture(scope="module")
def tree_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tree-schema")
    write_schema(directory, "tree.avsc", TREE)
    return directory


@settings(max_examples=150, deadline=None)
@given(tree=_trees)
def test_random_trees_decode_at_their_depth_and_not_one_level_less(
    tree_dir: Path, tree: dict[str, Any]
) -> None:
    value = encode_single_object(TREE, tree)
    depth = levels(tree)
    assert local(tree_dir, max_nesting_depth=depth)(value) == tree
    with pytest.raises(DecodeError) as caught:
        local(tree_dir, max_nesting_depth=depth - 1)(value)
    assert caught.value.field == "nesting depth"
