"""A job spec file read as a tree of values that know their line and column, checked against
baton.v1.JobSpec field by field before json_format.ParseDict builds the message. ParseDict alone
names neither the line nor the stage, speaks camelCase, and cannot tell a typo from a stray key;
people write these files by hand, so an error here says where, in snake_case, and what would do."""

from __future__ import annotations

import bisect
import difflib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from services.common.api.baton.v1 import jobs_pb2
from services.common.errors import InvalidArgument

MAPPING, SEQUENCE, SCALAR = "mapping", "list", "scalar"
# A seed of -1 means "random", as in A1111 and ComfyUI: the field stays unset and the gateway
# draws the job's seed at submit (a stage without one uses the job's).
RANDOM_SEED = -1
_F = FieldDescriptor
_INT_RANGES = {
    _F.CPPTYPE_INT32: ("int32", -(2**31), 2**31 - 1),
    _F.CPPTYPE_INT64: ("int64", -(2**63), 2**63 - 1),
    _F.CPPTYPE_UINT32: ("uint32", 0, 2**32 - 1),
    _F.CPPTYPE_UINT64: ("uint64", 0, 2**64 - 1),
}
# Free-form well-known types and the shape each takes; ParseDict checks the rest of google.protobuf.
_FREE_FORM = {"google.protobuf.Struct": MAPPING, "google.protobuf.ListValue": SEQUENCE, "google.protobuf.Value": ""}
# Repeated fields whose items people know by their `name`.
_NAMED_ITEMS = {"stages": "stage", "inputs": "input"}
_JOB_SPEC = cast(Descriptor, jobs_pb2.JobSpec.DESCRIPTOR)
_STAGE = cast(Descriptor, jobs_pb2.StageSpec.DESCRIPTOR)
_UNSET = object()


@dataclass(frozen=True)
class Node:
    """A value of a spec file, where it starts (1-based) and, for a scalar, how it was written."""

    kind: str
    value: Any  # list[tuple[Node, Node]] for a mapping, list[Node] for a list, else the scalar
    text: str
    line: int
    column: int

    def plain(self) -> Any:
        """The value as yaml.safe_load or json.loads would give it."""
        if self.kind == MAPPING:
            return {k.plain(): v.plain() for k, v in self.value}
        if self.kind == SEQUENCE:
            return [v.plain() for v in self.value]
        return self.value


@dataclass(frozen=True)
class Place:
    """Where a value sits in the JobSpec: its snake_case path and the stage or input it is part of."""

    path: str
    owner: str = ""

    def child(self, name: str, owner: str = "") -> Place:
        sep = "" if name.startswith("[") else "."
        return Place(f"{self.path}{sep}{name}", owner or self.owner)

    def __str__(self) -> str:
        return f"{self.owner}, {self.path}" if self.owner else self.path


def parse_spec(text: str, source: str, fmt: str) -> jobs_pb2.JobSpec:
    """The JobSpec in `text` ("yaml" or "json"); an error starts with `source`, then line:column."""
    root = read_json(text, source) if fmt == "json" else read_yaml(text, source)
    if root.kind != MAPPING:
        raise InvalidArgument(
            f"{source}:{root.line}:{root.column}: the top level must be a mapping of JobSpec fields, "
            f"not {_describe(root)}"
        )
    check = _SpecCheck(source)
    data = check.message(root, _JOB_SPEC, Place("JobSpec"))
    try:
        return json_format.ParseDict(data, jobs_pb2.JobSpec())
    except json_format.ParseError as e:
        raise check.located(e) from e


def check_value(value: Any, field: FieldDescriptor, path: str) -> Any:
    """One field's value, plain data as from JSON or YAML, checked and converted as a spec file's
    would be; None where it leaves the field unset (null; -1 for a seed). Errors say `<path>: <what>`."""
    if value is None:
        return None
    checked = _ValueCheck(path).field(_plain_node(value), field, Place(path))
    return None if checked is _UNSET else checked


def read_yaml(text: str, source: str) -> Node:
    """The single YAML document in `text` as located nodes (SafeLoader's types and merge keys)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        return Node(SCALAR, None, "", 1, 1) if node is None else _YamlReader(loader).node(node)
    except yaml.YAMLError as e:
        raise InvalidArgument(f"{source}: not valid yaml: {e}") from e
    except RecursionError as e:
        raise InvalidArgument(f"{source}: nested too deeply, or an alias contains itself") from e
    finally:
        loader.dispose()


def read_json(text: str, source: str) -> Node:
    """The JSON value in `text` as located nodes."""
    try:
        json.loads(text)  # its message says what is wrong with a file that is not JSON at all
    except json.JSONDecodeError as e:
        raise InvalidArgument(f"{source}: not valid json: {e}") from e
    return _JsonReader(text).node(0)[0]


class _YamlReader:
    """Turns composed YAML nodes into located nodes, once per node however often it is aliased."""

    def __init__(self, loader: yaml.SafeLoader):
        self.loader = loader
        self.done: dict[int, Node] = {}

    def node(self, node: yaml.Node) -> Node:
        if id(node) not in self.done:
            self.done[id(node)] = self._convert(node)
        return self.done[id(node)]

    def _convert(self, node: yaml.Node) -> Node:
        line, column = node.start_mark.line + 1, node.start_mark.column + 1
        if isinstance(node, yaml.SequenceNode):
            return Node(SEQUENCE, [self.node(v) for v in node.value], "", line, column)
        if not isinstance(node, yaml.MappingNode):
            return Node(SCALAR, self.loader.construct_object(node, deep=True), str(node.value), line, column)
        own = {id(k) for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge"}
        self.loader.flatten_mapping(node)  # `<<: *defaults` pairs come first, the mapping's own after
        pairs = [(id(k) in own, self.node(k), self.node(v)) for k, v in node.value]
        mine = [(k, v) for is_own, k, v in pairs if is_own]
        # A merged key gives way to the mapping's own and to later merges, as in safe_load; only
        # a key that the mapping itself repeats is an error.
        taken = {_key_of(k) for k, _ in mine}
        merged = []
        for is_own, k, v in reversed(pairs):
            if not is_own and _key_of(k) not in taken:
                taken.add(_key_of(k))
                merged.append((k, v))
        return Node(MAPPING, merged[::-1] + mine, "", line, column)


class _JsonReader:
    """Walks text that json.loads has accepted, noting where each value starts."""

    _SPACE = re.compile(r"[ \t\n\r]*")

    def __init__(self, text: str):
        self.text = text
        self.line_starts = [0, *(m.end() for m in re.finditer("\n", text))]
        self.decoder = json.JSONDecoder()

    def node(self, pos: int) -> tuple[Node, int]:
        pos = self._skip(pos)
        line = bisect.bisect_right(self.line_starts, pos)
        column = pos - self.line_starts[line - 1] + 1
        opener = self.text[pos]
        if opener not in "[{":
            value, end = self.decoder.raw_decode(self.text, pos)
            return Node(SCALAR, value, self.text[pos:end], line, column), end
        closer = "}" if opener == "{" else "]"
        items: list[Any] = []
        pos = self._skip(pos + 1)
        while self.text[pos] != closer:
            item: Any
            item, pos = self.node(pos)
            if opener == "{":
                value, pos = self.node(self._skip(pos) + 1)  # past the ':'
                item = (item, value)
            items.append(item)
            pos = self._skip(pos)
            if self.text[pos] == ",":
                pos = self._skip(pos + 1)
        return Node(MAPPING if opener == "{" else SEQUENCE, items, "", line, column), pos + 1

    def _skip(self, pos: int) -> int:
        match = self._SPACE.match(self.text, pos)
        return match.end() if match else pos


class _SpecCheck:
    """Checks located nodes against a message descriptor and returns plain data keyed by field names."""

    def __init__(self, source: str):
        self.source = source
        self.seen: dict[str, tuple[Node, Place]] = {}  # so that a ParseDict error can be located

    def fail(self, node: Node, place: Place, what: str) -> InvalidArgument:
        return InvalidArgument(f"{self.source}:{node.line}:{node.column}: {place}: {what}")

    def message(self, node: Node, desc: Descriptor, place: Place) -> dict[str, Any]:
        if node.kind != MAPPING:
            raise self.fail(node, place, f"expected a mapping of {desc.name} fields, got {_describe(node)}")
        data: dict[str, Any] = {}
        keys: dict[str, Node] = {}
        oneofs: dict[str, str] = {}
        for key, value in node.value:
            field = _field_named(desc, key.value) if key.kind == SCALAR else None
            if field is None:
                raise self.fail(key, place.child(_key_text(key)), _unknown_field(desc, key))
            here = place.child(field.name)
            if field.name in keys:
                raise self.fail(key, here, f"given twice (first at line {keys[field.name].line})")
            keys[field.name] = key
            if value.kind == SCALAR and value.value is None and not _takes_null(field):
                continue  # null leaves a field unset, as ParseDict does
            oneof = field.containing_oneof
            if oneof is not None and oneof.name in oneofs:
                rival = oneofs[oneof.name]
                raise self.fail(
                    key,
                    here,
                    f"{desc.name} takes one of {', '.join(f.name for f in oneof.fields)}; "
                    f"{rival} is already given at line {keys[rival].line}",
                )
            if oneof is not None:
                oneofs[oneof.name] = field.name
            converted = self.field(value, field, here)
            if converted is not _UNSET:
                data[field.name] = converted
        return data

    def field(self, node: Node, field: FieldDescriptor, place: Place) -> Any:
        self.seen[place.path] = (node, place)
        if _is_map(field):
            value_field = _message_of(field).fields_by_name["value"]
            if node.kind != MAPPING:
                expected = f"a mapping, each value {_expected(value_field)}"
                raise self.fail(node, place, f"expected {expected}, got {_describe(node)}")
            key_field = _message_of(field).fields_by_name["key"]
            entries = {}
            for key, value in node.value:
                at = place.child(f"[{_key_text(key)!r}]")
                entries[self.single(key, key_field, at)] = self.single(value, value_field, at)
            return entries
        if not field.is_repeated:
            return self.single(node, field, place)
        if node.kind != SEQUENCE:
            raise self.fail(node, place, f"expected a list, each item {_expected(field)}, got {_describe(node)}")
        label = _NAMED_ITEMS.get(field.name, "")
        items = []
        for i, item in enumerate(node.value):
            name = _name_of(item) if label else ""
            items.append(self.single(item, field, place.child(f"[{i}]", f"{label} {name!r}" if name else "")))
        return items

    def single(self, node: Node, field: FieldDescriptor, place: Place) -> Any:
        self.seen[place.path] = (node, place)
        if field.cpp_type == _F.CPPTYPE_MESSAGE:
            type_name = _message_of(field).full_name
            if not type_name.startswith("google.protobuf."):
                return self.message(node, _message_of(field), place)
            if _FREE_FORM.get(type_name, node.kind) not in ("", node.kind):
                raise self.fail(node, place, f"expected {_expected(field)}, got {_describe(node)}")
            return node.plain()
        if node.kind != SCALAR or node.value is None:
            raise self.fail(node, place, f"expected {_expected(field)}, got {_describe(node)}")
        if field.cpp_type == _F.CPPTYPE_ENUM:
            return self.enum(node, field, place)
        if field.cpp_type in _INT_RANGES:
            return self.integer(node, field, place)
        value = node.value
        if field.cpp_type == _F.CPPTYPE_STRING:
            ok = isinstance(value, str)
        elif field.cpp_type == _F.CPPTYPE_BOOL:
            ok = isinstance(value, bool)
        else:
            ok = _is_number(value)
        if ok:
            return value
        hint = "; quote it to mean the text" if field.cpp_type == _F.CPPTYPE_STRING else ""
        raise self.fail(node, place, f"expected {_expected(field)}, got {_describe(node)}{hint}")

    def integer(self, node: Node, field: FieldDescriptor, place: Place) -> int | object:
        value = node.value
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value):
            number = int(value)  # protobuf's JSON mapping writes 64-bit integers as strings
        else:
            raise self.fail(node, place, f"expected {_expected(field)}, got {_describe(node)}")
        kind, low, high = _INT_RANGES[field.cpp_type]
        if _is_seed(field):
            if number == RANDOM_SEED:
                return _UNSET
            if not low <= number <= high:
                raise self.fail(node, place, f"{number} is not a seed: seeds are 0..2**64-1; -1 means a random seed")
        elif not low <= number <= high:
            raise self.fail(node, place, f"{number} is out of range for {kind} ({low}..{high})")
        return number

    def enum(self, node: Node, field: FieldDescriptor, place: Place) -> Any:
        value, names = node.value, [v.name for v in _enum_of(field).values]
        if (isinstance(value, int) and not isinstance(value, bool)) or value in names:
            return value
        text = str(value)
        # `method: net` for CONVERSION_METHOD_NET
        close = [n for n in names if n.endswith("_" + text.upper())] or difflib.get_close_matches(text, names, 1)
        hint = f'did you mean "{close[0]}"?' if close else f"accepted: {', '.join(names)}"
        raise self.fail(node, place, f"{_describe(node)} is not a {_enum_of(field).name}; {hint}")

    def located(self, error: json_format.ParseError) -> InvalidArgument:
        """ParseDict's error at the line of the deepest value its path names, when it names one."""
        paths = re.findall(r"\bat \"?(JobSpec(?:\.\w+|\[\d+\])*)", str(error))
        path = paths[-1] if paths else ""
        while path and path not in self.seen:
            shorter = re.sub(r"(\.[^.\[]*|\[[^\]]*\])$", "", path)
            path = "" if shorter == path else shorter
        if not path:
            return InvalidArgument(f"{self.source}: {error}")
        node, place = self.seen[path]
        return self.fail(node, place, str(error))


class _ValueCheck(_SpecCheck):
    """The spec file's checks of one value that has no file: errors name its path, not a line."""

    def fail(self, node: Node, place: Place, what: str) -> InvalidArgument:
        return InvalidArgument(f"{place.path}: {what}")


def _plain_node(value: Any) -> Node:
    """Plain data as nodes, so that _SpecCheck can check it; every node is at 1:1."""
    if isinstance(value, Mapping):
        return Node(MAPPING, [(_plain_node(k), _plain_node(v)) for k, v in value.items()], "", 1, 1)
    if isinstance(value, list | tuple):
        return Node(SEQUENCE, [_plain_node(v) for v in value], "", 1, 1)
    return Node(SCALAR, value, value if isinstance(value, str) else json.dumps(value), 1, 1)


def _field_named(desc: Descriptor, name: Any) -> FieldDescriptor | None:
    """A field by its proto name or its JSON (camelCase) name, both of which ParseDict accepts."""
    if not isinstance(name, str):
        return None
    return desc.fields_by_name.get(name) or next((f for f in desc.fields if f.json_name == name), None)


def _unknown_field(desc: Descriptor, key: Node) -> str:
    name = _key_text(key)
    what = f'unknown field "{name}" of {desc.name}'
    kinds = [(f.name, _field_named(_message_of(f), name)) for f in _STAGE.oneofs_by_name["kind"].fields]
    homes = [f"{kind}.{field.name}" for kind, field in kinds if field is not None]
    if homes and desc.full_name in (_JOB_SPEC.full_name, _STAGE.full_name):
        # Flat A1111-style specs put `prompt` or `steps` on the job or the stage itself.
        where = "stages[i]." if desc.full_name == _JOB_SPEC.full_name else ""
        return f"{what}; it goes in a stage's kind: {' or '.join(where + home for home in homes)}"
    aliases = {f.name.lower(): f.name for f in desc.fields} | {f.json_name.lower(): f.name for f in desc.fields}
    close = difflib.get_close_matches(name.lower(), aliases, n=1)
    if close:
        return f'{what}; did you mean "{aliases[close[0]]}"?'
    return f"{what}; its fields are {', '.join(f.name for f in desc.fields)}"


def _expected(field: FieldDescriptor) -> str:
    """What one value of `field` may be, in words."""
    cpp = field.cpp_type
    if cpp == _F.CPPTYPE_MESSAGE:
        type_name = _message_of(field).full_name
        if type_name in _FREE_FORM:
            return {MAPPING: "a mapping", SEQUENCE: "a list"}.get(_FREE_FORM[type_name], "any value")
        return f"a mapping of {_message_of(field).name} fields"
    if cpp == _F.CPPTYPE_ENUM:
        return f"one of {', '.join(v.name for v in _enum_of(field).values)}"
    if cpp in _INT_RANGES:
        seed = "an integer 0..2**64-1, or -1 for a random seed"
        return seed if _is_seed(field) else f"an integer ({_INT_RANGES[cpp][0]})"
    if cpp == _F.CPPTYPE_STRING:
        return "base64 text" if field.type == _F.TYPE_BYTES else "a string"
    return "true or false" if cpp == _F.CPPTYPE_BOOL else "a number"


def _describe(node: Node) -> str:
    value = node.value
    if node.kind != SCALAR:
        return "a mapping" if node.kind == MAPPING else "a list"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {node.text}"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, int | float):
        return f"the number {node.text}" if math.isfinite(value) else f"the non-finite number {node.text}"
    return f"{node.text} (read as a {type(value).__name__})"


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return math.isfinite(value)  # ParseDict takes non-finite numbers only as "NaN", "Infinity" text
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return False


def _message_of(field: FieldDescriptor) -> Descriptor:
    return cast(Descriptor, field.message_type)


def _enum_of(field: FieldDescriptor) -> EnumDescriptor:
    return cast(EnumDescriptor, field.enum_type)


def _is_seed(field: FieldDescriptor) -> bool:
    return field.name == "seed" and field.has_presence


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and bool(field.message_type.GetOptions().map_entry)


def _takes_null(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.full_name == "google.protobuf.Value"


def _name_of(node: Node) -> str:
    if node.kind != MAPPING:
        return ""
    return next((v.value for k, v in node.value if k.value == "name" and isinstance(v.value, str)), "")


def _key_of(key: Node) -> Any:
    return key.value if key.kind == SCALAR else id(key)


def _key_text(key: Node) -> str:
    if isinstance(key.value, str):
        return key.value
    return key.text if key.kind == SCALAR else _describe(key)
