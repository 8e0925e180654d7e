"""Limits on what one Avro value may make fastavro do, checked before fastavro sees its bytes.

fastavro's C reader recurses once per nested record, array or map, about 1.8 KB of C stack a
level, and nothing stops it: a recursive writer schema (a record that can hold itself through a
union, array or map) lets a value nest as deep as its bytes allow. A linked list 20,000 nodes
deep fits in 40 KB and overflows an 8 MiB stack: SIGSEGV, which no bad-record policy sees, so a
restart meets the same record forever. A value nesting deeper than `max_nesting_depth` levels
(records, arrays and maps; the outermost record is level 1) is a `DecodeError` with
`field="nesting depth"`.

fastavro also makes one Python object per array item, as many as a block's header declares.
Items of zero encoded width (null, fixed of size 0, an empty record) take no bytes, so 15
bytes can declare 2**26 of them: seconds of CPU and gigabytes of memory. A value declaring
more than `MAX_ZERO_WIDTH_ITEMS` of them in all is a `DecodeError` with `field="item count"`,
and so is a block declaring more items (or map entries) than the bytes left could hold, as
every other item takes a byte at least.

The checks walk the value's bytes against the writer schema without recursion and without
building objects (`ValueGuard.check`). Only a writer schema that needs it gets a guard
(`guard_for`): one that is recursive, nests deeper than the limit, or has an array of
zero-width items. Any other schema bounds the depth of its values by itself, and fastavro runs
out of bytes before it can make more items than there are bytes, so its values go straight to
fastavro and pay nothing.
"""

from __future__ import annotations

from typing import Any

from consumer.core.errors import ConfigError, DecodeError

# 256 levels take about 0.5 MB of C stack in fastavro: less than half of a 1 MiB thread stack
# (what Alpine's Python gives its threads; fastavro overflows one past ~570 levels), a twentieth
# of the 8 MiB the main thread and worker threads get from glibc by default (~4,600 levels).
DEFAULT_MAX_NESTING_DEPTH = 256
# A limit above this could let a value overflow a default 8 MiB thread stack in fastavro.
MAX_NESTING_DEPTH_ALLOWED = 2_000
# Items of zero width one value may declare, over all its arrays: at most ~4 ms of fastavro's
# time and ~1 MB of memory (empty records, the dearest), where 2**26 took 25 s and 4.6 GiB.
MAX_ZERO_WIDTH_ITEMS = 10_000

# How the walk reads each kind of schema node.
_FIXED = 0  # a fixed number of bytes: null (0), boolean (1), float (4), double (8), fixed (n)
_VARINT = 1  # int, long, enum
_BYTES = 2  # bytes, string: a varint length, then that many bytes
_RECORD = 3
_UNION = 4
_ARRAY = 5
_MAP = 6
_FIXED_WIDTH = {"null": 0, "boolean": 1, "float": 4, "double": 8}
_VARINTS = frozenset({"int", "long"})
_BYTE_STRINGS = frozenset({"bytes", "string"})
_NAMED = frozenset({"record", "error", "enum", "fixed"})
_KINDS = _NAMED | _FIXED_WIDTH.keys() | _VARINTS | _BYTE_STRINGS | {"array", "map"}
# The longest varint of a 64-bit long; a longer one is not Avro.
_MAX_VARINT_BYTES = 10


class _Type:
    """One node of the writer schema's graph, as the walk reads it. Named types are one node
    each, so a recursive schema is a graph with a cycle."""

    __slots__ = ("children", "kind", "label", "size", "zero_width")

    def __init__(self) -> None:
        self.kind = _FIXED
        self.size = 0
        # Record fields in reverse (the walk pushes them on a stack), union branches, or the
        # one items/values type of an array or map.
        self.children: list[_Type] = []
        self.label = ""  # for messages: "array in field 'tags'"
        # Its values take no bytes (null, fixed of size 0, a record of such fields).
        self.zero_width = False

    def opens_level(self) -> bool:
        return self.kind in (_RECORD, _ARRAY, _MAP)


def check_max_nesting_depth(value: int) -> int:
    """`value` if it is a usable nesting depth limit, else a `ConfigError`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError("max_nesting_depth must be an integer", setting="max_nesting_depth")
    if not 1 <= value <= MAX_NESTING_DEPTH_ALLOWED:
        raise ConfigError(
            f"max_nesting_depth must be between 1 and {MAX_NESTING_DEPTH_ALLOWED}: deeper "
            "values could overflow fastavro's C stack",
            setting="max_nesting_depth",
            value=value,
        )
    return value


# --- the writer schema as a graph ------------------------------------------------------------


def _compile(schema: Any) -> _Type:
    """The graph of a schema as fastavro.parse_schema returns it (references to named types
    are their full names). Built with a work list, not recursion: a schema may nest deeply."""
    named: dict[str, _Type] = {}
    pending: list[tuple[Any, _Type, str | None]] = []
    root = _child(schema, None, named, pending)
    while pending:
        source, node, field = pending.pop()
        _fill(node, source, field, named, pending)
    return root


def _child(
    source: Any,
    field: str | None,
    named: dict[str, _Type],
    pending: list[tuple[Any, _Type, str | None]],
) -> _Type:
    """The node for a schema met in field `field`: a named type's one node (filled where the
    type is defined), or a new node, filled later from `pending`."""
    while isinstance(source, dict) and isinstance(source.get("type"), dict | list):
        source = source["type"]  # {"type": {...}}: the inner schema is the type
    kind = source.get("type") if isinstance(source, dict) else source
    if isinstance(kind, str) and kind not in _KINDS:  # a reference to a named type
        return named.setdefault(kind, _Type())
    node = _Type()
    if isinstance(kind, str) and kind in _NAMED:
        node = named.setdefault(str(source["name"]), node)
    pending.append((source, node, field))
    return node


def _fill(
    node: _Type,
    source: Any,
    field: str | None,
    named: dict[str, _Type],
    pending: list[tuple[Any, _Type, str | None]],
) -> None:
    """Make `node` the node of `source`; its children go to `pending`."""
    if isinstance(source, list):
        node.kind, node.label = _UNION, "union"
        node.children = [_child(branch, field, named, pending) for branch in source]
        return
    kind = source.get("type") if isinstance(source, dict) else source
    node.label = f"{kind} in field {field!r}" if field else str(kind)
    if kind in ("record", "error"):
        node.kind, node.label = _RECORD, str(source["name"])
        fields = source.get("fields") or []
        node.children = [_child(f["type"], f["name"], named, pending) for f in reversed(fields)]
    elif kind in ("array", "map"):
        node.kind = _ARRAY if kind == "array" else _MAP
        inner = source["items"] if kind == "array" else source["values"]
        node.children = [_child(inner, field, named, pending)]
    elif kind == "fixed":
        node.kind, node.size = _FIXED, int(source["size"])
    elif kind in _FIXED_WIDTH:
        node.kind, node.size = _FIXED, _FIXED_WIDTH[kind]
    elif kind in _BYTE_STRINGS:
        node.kind = _BYTES
    else:  # int, long, enum
        node.kind = _VARINT


def _nodes(root: _Type) -> list[_Type]:
    """Every node reachable from `root`, each once."""
    seen = {id(root)}
    found = [root]
    for node in found:  # grows while iterated: a breadth-first walk
        for child in node.children:
            if id(child) not in seen:
                seen.add(id(child))
                found.append(child)
    return found


def _mark_zero_width(nodes: list[_Type]) -> None:
    """Set `zero_width` on every node whose values take no bytes: the least fixed point, so a
    record on a cycle (which passes through a union, array or map: at least a byte) is not."""
    for node in nodes:
        node.zero_width = node.kind == _FIXED and node.size == 0
    changed = True
    while changed:
        changed = False
        for node in nodes:
            zero = node.kind == _RECORD and all(child.zero_width for child in node.children)
            if zero and not node.zero_width:
                node.zero_width = changed = True


def _depth_bound(root: _Type) -> int | None:
    """The most levels a value of `root` can nest, or None if unbounded (a cycle: the schema
    is recursive). An iterative depth-first walk."""
    bound: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[_Type, int]] = [(root, 0)]
    on_path.add(id(root))
    while stack:
        node, next_child = stack[-1]
        if next_child < len(node.children):
            stack[-1] = (node, next_child + 1)
            child = node.children[next_child]
            if id(child) in on_path:
                return None
            if id(child) not in bound:
                on_path.add(id(child))
                stack.append((child, 0))
            continue
        stack.pop()
        on_path.discard(id(node))
        deepest = max((bound[id(child)] for child in node.children), default=0)
        bound[id(node)] = deepest + node.opens_level()
    return bound[id(root)]


# --- the guard -------------------------------------------------------------------------------


class ValueGuard:
    """Checks a value's bytes against the limits before fastavro reads them."""

    def __init__(self, root: _Type, writer_label: str, max_depth: int) -> None:
        self._root = root
        self._writer_label = writer_label
        self._max_depth = max_depth

    def check(self, value: bytes, start: int) -> None:
        """Raise `DecodeError` if the Avro body at `value[start:]` breaks a limit, or is
        malformed before fastavro could get past a limit."""
        try:
            self._walk(value, start)
        except IndexError as exc:  # a varint ran past the end
            raise self._malformed(value, None) from exc
        except _Malformed as exc:
            if exc.field is not None:
                raise DecodeError(
                    f"value refused for {self._writer_label}: {exc.problem}", field=exc.field
                ) from exc
            raise self._malformed(value, exc.problem) from exc

    def _walk(self, data: bytes, pos: int) -> None:
        """Read one value from `data[pos]` without building it. The nodes still to read are on
        a stack (None closes a level), so a deep value costs heap, not C stack."""
        end, depth, limit = len(data), 0, self._max_depth
        stack: list[_Type | _Blocks | None] = [self._root]
        budget = [MAX_ZERO_WIDTH_ITEMS]  # zero-width items this value may still declare
        while stack:
            node = stack.pop()
            if node is None:
                depth -= 1
            elif isinstance(node, _Blocks):
                pos = node.next(stack, data, pos)
            else:
                kind = node.kind
                if kind == _VARINT:
                    pos = _skip_varint(data, pos)
                elif kind == _FIXED:
                    pos += node.size
                elif kind == _BYTES:
                    pos = _skip_bytes(data, pos)
                elif kind == _UNION:
                    branch, pos = _branch(node, data, pos)
                    stack.append(branch)
                else:  # a record, array or map: one level deeper
                    depth += 1
                    if depth > limit:
                        raise self._too_deep(pos)
                    _open(node, stack, budget)
                if pos > end:  # the last node read checks the end too
                    raise _Malformed

    def _too_deep(self, offset: int) -> DecodeError:
        return DecodeError(
            f"value nests deeper than {self._max_depth} levels (max_nesting_depth) for "
            f"{self._writer_label}: refused before decoding (at byte {offset})",
            field="nesting depth",
        )

    def _malformed(self, value: bytes, problem: str | None) -> DecodeError:
        if problem is None:
            return DecodeError(
                f"value truncated: not valid Avro for {self._writer_label} ({len(value)} bytes)"
            )
        return DecodeError(f"value is not valid Avro for {self._writer_label}: {problem}")


def guard_for(schema: Any, writer_label: str, max_depth: int) -> ValueGuard | None:
    """A guard for the values of writer schema `schema`, or None if they need none."""
    root = _compile(schema)
    nodes = _nodes(root)
    _mark_zero_width(nodes)
    bound = _depth_bound(root)
    empty_items = any(node.kind == _ARRAY and node.children[0].zero_width for node in nodes)
    if bound is not None and bound <= max_depth and not empty_items:
        return None
    return ValueGuard(root, writer_label, max_depth)


class _Malformed(Exception):  # noqa: N818 - internal: ValueGuard.check makes it a DecodeError
    def __init__(self, problem: str | None = None, *, field: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem  # None: the bytes ran out
        self.field = field  # the DecodeError's field, when a limit refused the value


_STRING = _Type()
_STRING.kind = _BYTES


class _Blocks:
    """An array or map being read: its items type, the items left in the current block."""

    __slots__ = ("block_end", "budget", "is_map", "items", "label", "left")

    def __init__(self, node: _Type, budget: list[int]) -> None:
        self.budget = budget  # the walk's zero-width items still allowed, shared
        self.items = node.children[0]
        self.is_map = node.kind == _MAP
        self.label = node.label
        self.left = 0
        self.block_end = -1  # where the block ends, when its header gave its size in bytes

    def next(self, stack: list[_Type | _Blocks | None], data: bytes, pos: int) -> int:
        """Put the next item on `stack` (and this array or map back under it), reading a block
        header first when the block is done; nothing at the end. Returns the new position."""
        while not self.left:  # items that take no bytes leave it at 0: on to the next block
            if self.block_end >= 0 and pos != self.block_end:
                raise _Malformed(f"a block of {self.label} does not end where its size says")
            count, pos = self._header(data, pos)
            if not count:
                return pos  # the end
        self.left -= 1
        stack.append(self)
        stack.append(self.items)
        if self.is_map:
            stack.append(_STRING)  # the key comes first
        return pos

    def _header(self, data: bytes, pos: int) -> tuple[int, int]:
        """Read a block header: the block's item count, and the position after the header.
        Sets the items left to read and, if the header gives it, where the block ends."""
        count, pos = _read_long(data, pos)
        self.block_end = -1
        if count < 0:  # a negative count is followed by the block's size in bytes
            count = -count
            size, pos = _read_long(data, pos)
            if size < 0:
                raise _Malformed(f"negative block size {size}")
            self.block_end = pos + size
        if self.items.zero_width and not self.is_map:
            self.budget[0] -= count
            if self.budget[0] < 0:
                raise _Malformed(
                    f"{self.label} declares {count} items of zero width, past the "
                    f"{MAX_ZERO_WIDTH_ITEMS} one value may hold",
                    field="item count",
                )
            return count, pos  # nothing to read; such items nest no deeper than their schema
        if count > len(data) - pos:  # every item (every map key) takes a byte at least
            raise _Malformed(
                f"{self.label} declares {count} items with {len(data) - pos} bytes left, "
                "and each takes a byte at least",
                field="item count",
            )
        self.left = count
        return count, pos


def _open(node: _Type, stack: list[_Type | _Blocks | None], budget: list[int]) -> None:
    """Put what a record, array or map holds on `stack`, over the None that closes its level."""
    stack.append(None)
    if node.kind == _RECORD:
        stack.extend(node.children)
    else:
        stack.append(_Blocks(node, budget))


def _skip_varint(data: bytes, pos: int) -> int:
    start = pos
    while data[pos] & 0x80:
        pos += 1
    if pos - start >= _MAX_VARINT_BYTES:
        raise _Malformed("a varint longer than 10 bytes")
    return pos + 1


def _skip_bytes(data: bytes, pos: int) -> int:
    size, pos = _read_long(data, pos)
    if size < 0:
        raise _Malformed(f"negative length {size}")
    return pos + size


def _branch(union: _Type, data: bytes, pos: int) -> tuple[_Type, int]:
    index, pos = _read_long(data, pos)
    if not 0 <= index < len(union.children):
        raise _Malformed(f"union index {index} out of range")
    return union.children[index], pos


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    """The zigzag varint at `data[pos]`, and the position after it."""
    byte = data[pos]
    value, shift, start = byte & 0x7F, 7, pos
    pos += 1
    while byte & 0x80:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        shift += 7
        pos += 1
        if pos - start > _MAX_VARINT_BYTES:
            raise _Malformed("a varint longer than 10 bytes")
    return (value >> 1) ^ -(value & 1), pos
