"""FHIR R4 XML <-> JSON, driven by the compiled R4 definitions (spec: "XML representation").

The server works in JSON; XML is converted at the edge. What the conversion relies on:
- element types and cardinalities from definitions.json.gz, element order from
  xml_order.json.gz (XML is order-sensitive; both generated from the official definitions);
- primitives are ``<name value="..."/>``; their ``id`` and extensions are the JSON ``_name``;
- ``id`` of a datatype or backbone element and ``Extension.url`` are XML attributes;
- contained and Bundle/Parameters resources nest as ``<resource><Patient>...</Patient></resource>``;
- the narrative div is XHTML, checked and kept as it is (fhir/xhtml.py);
- decimals keep their exact text (1.50 stays 1.50).
Parsing is hardened (defusedxml: no DTD, no entities, no external access); any problem is a
400 OperationOutcome naming the element path, never the submitted value.
"""

from __future__ import annotations

import functools
import gzip
import json
import re
from collections.abc import Iterator
from importlib import resources
from typing import Any
from xml.etree.ElementTree import Element

import orjson
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring

from fhirvault.domain import errors, xhtml
from fhirvault.domain.r4 import FLAG_ARRAY, is_resource_type, load_tables

FHIR_NS = "http://hl7.org/fhir"
_FHIR_TAG = "{" + FHIR_NS + "}"
_XSI = "{http://www.w3.org/2001/XMLSchema-instance}"
ORDER_FILE = "xml_order.json.gz"
_DIV_TAG = "{" + xhtml.XHTML + "}div"
MAX_DEPTH = 128  # FHIR resources nest far less; stops stack exhaustion on hostile input

_NOT_XML_CHAR = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_INTEGER = re.compile(r"^[+-]?[0-9]{1,10}$")
_DECIMAL = re.compile(r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?$")


class RawNumber(str):
    """A JSON decimal kept as its text, so that 1.50 is written back as 1.50."""

    __slots__ = ()


@functools.cache
def _order() -> dict[str, tuple[str, ...]]:
    raw = resources.files("fhirvault.domain.r4").joinpath(ORDER_FILE).read_bytes()
    data = json.loads(gzip.decompress(raw))
    if data.get("format") != 1:
        raise RuntimeError(f"{ORDER_FILE}: unsupported table format {data.get('format')!r}")
    return {name: tuple(props) for name, props in data["order"].items()}


def _bad(message: str, path: str) -> errors.OperationOutcomeError:
    return errors.bad_request(f"{message} ({path[:200]})", path[:200], code="structure")


# ------------------------------------------------------------------ XML -> JSON

def xml_to_json(data: bytes) -> bytes:
    """A FHIR XML resource as FHIR JSON bytes; 400 when it is not valid FHIR XML."""
    return orjson.dumps(parse_xml(data))


def parse_xml(data: bytes) -> dict[str, Any]:
    if not data.strip():
        raise errors.bad_request("The request body is empty.")
    try:
        root = fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException:
        raise errors.bad_request("XML with a DTD, entity declarations or external references is refused.",
                                 code="security") from None
    except (ParseError, ValueError):
        raise errors.bad_request("The request body is not well-formed XML.", code="structure") from None
    return _resource(root, "", 0)


def _local(elem: Element, path: str) -> str:
    tag = elem.tag
    if not isinstance(tag, str) or not tag.startswith(_FHIR_TAG):
        raise _bad("Element outside the FHIR namespace http://hl7.org/fhir", path)
    return tag[len(_FHIR_TAG):]


def _resource(elem: Element, path: str, depth: int) -> dict[str, Any]:
    rtype = _local(elem, path or "(root)")
    if not is_resource_type(rtype):
        raise _bad("Not a FHIR R4 resource type", path or "(root)")
    if any(not name.startswith(_XSI) for name in elem.attrib):  # xsi:schemaLocation is common and harmless
        raise _bad("Unexpected XML attribute on a resource", rtype)
    out: dict[str, Any] = {"resourceType": rtype}
    _fill(out, elem, rtype, rtype, depth + 1, is_resource=True)
    return out


def _no_text(elem: Element, path: str) -> None:
    if elem.text is not None and elem.text.strip():
        raise _bad("Unexpected text content", path)
    for child in elem:
        if child.tail is not None and child.tail.strip():
            raise _bad("Unexpected text content", path)


def _fill(out: dict[str, Any], elem: Element, table_name: str, path: str, depth: int,
          *, is_resource: bool = False) -> None:
    if depth > MAX_DEPTH:
        raise _bad("Nested too deeply", path)
    tables = load_tables()
    table = tables["tables"][table_name]
    _no_text(elem, path)
    if not is_resource:
        for attr, text in elem.attrib.items():
            if attr == "id" or (attr == "url" and table_name == "Extension"):
                out[attr] = text
            else:
                raise _bad("Unexpected XML attribute", f"{path}@{attr}"[:200])
    arrays: dict[str, list[Any]] = {}
    extras: dict[str, list[Any]] = {}
    for child in elem:
        name = "div" if child.tag == _DIV_TAG and table_name == "Narrative" else _local(child, path)
        child_path = f"{path}.{name}"
        entry = table.get(name)
        if entry is None:
            raise _bad("Unknown element", child_path)
        if not is_resource and (name == "id" or (name == "url" and table_name == "Extension")):
            raise _bad("This is an XML attribute, not an element", child_path)
        type_name, flags = entry[0], entry[1]
        repeats = bool(flags & FLAG_ARRAY)
        if not repeats and (name in out or f"_{name}" in out):
            raise _bad("Element repeated but allows one value", child_path)
        value: Any
        if type_name in tables["primitives"]:
            if type_name == "xhtml":
                value, extra = _div(child, child_path), None
            else:
                value, extra = _primitive(child, type_name, child_path, depth)
            if repeats:
                arrays.setdefault(name, []).append(value)
                extras.setdefault(name, []).append(extra)
            else:
                if value is not None:
                    out[name] = value
                if extra is not None:
                    out[f"_{name}"] = extra
            continue
        if type_name == "Resource":
            value = _nested_resource(child, child_path, depth)
        else:
            complex_value: dict[str, Any] = {}
            _fill(complex_value, child, type_name, child_path, depth + 1)
            if not complex_value:
                raise _bad("Empty element", child_path)
            value = complex_value
        if repeats:
            arrays.setdefault(name, []).append(value)
        else:
            out[name] = value
    for name, values in arrays.items():
        kept = extras.get(name)
        if any(v is not None for v in values):
            out[name] = values
        if kept is not None and any(e is not None for e in kept):
            out[f"_{name}"] = kept


def _nested_resource(elem: Element, path: str, depth: int) -> dict[str, Any]:
    _no_text(elem, path)
    children = list(elem)
    if elem.attrib or len(children) != 1:
        raise _bad("A resource element holds exactly one resource", path)
    return _resource(children[0], path, depth + 1)


def _primitive(elem: Element, type_name: str, path: str, depth: int) -> tuple[Any, dict[str, Any] | None]:
    _no_text(elem, path)
    value: Any = None
    extra: dict[str, Any] = {}
    for attr, raw in elem.attrib.items():
        if attr == "value":
            value = _typed(raw, type_name, path)
        elif attr == "id":
            extra["id"] = raw
        else:
            raise _bad("Unexpected XML attribute", f"{path}@{attr}"[:200])
    for child in elem:
        name = _local(child, path)
        if name != "extension":
            raise _bad("A primitive holds only extensions", f"{path}.{name}")
        item: dict[str, Any] = {}
        _fill(item, child, "Extension", f"{path}.extension", depth + 1)
        extra.setdefault("extension", []).append(item)
    if value is None and not extra:
        raise _bad("A primitive element needs a value attribute or extensions", path)
    if value is not None and value == "":
        raise _bad("Empty value attribute", path)
    return value, (extra or None)


def _typed(raw: str, type_name: str, path: str) -> Any:
    kind = load_tables()["primitives"][type_name]["json"]
    if kind == "boolean":
        if raw not in ("true", "false"):
            raise _bad("A boolean is true or false", path)
        return raw == "true"
    if kind == "integer":
        if not _INTEGER.match(raw) or not -(2**31) <= int(raw) < 2**31:
            raise _bad("Not a 32-bit integer", path)
        return int(raw)
    if kind == "decimal":
        if not _DECIMAL.match(raw):
            raise _bad("Not a decimal", path)
        return orjson.Fragment(raw.encode())  # the exact digits, validated above: no JSON injection
    return raw


def _div(elem: Element, path: str) -> str:
    if elem.attrib or elem.tag != _DIV_TAG:
        raise _bad("The narrative is a <div> in the XHTML namespace", path)
    xhtml.check(elem)
    return xhtml.to_string(elem)


# ------------------------------------------------------------------ JSON -> XML

def json_to_xml(data: bytes) -> bytes:
    """FHIR JSON bytes (a resource) as FHIR XML bytes, decimals kept exact."""
    try:
        resource = json.loads(data, parse_float=RawNumber)
    except (ValueError, RecursionError):
        raise NotRepresentable("not JSON") from None
    return to_xml(resource)


def to_xml(resource: dict[str, Any]) -> bytes:
    out = ['<?xml version="1.0" encoding="UTF-8"?>']
    _write_resource(resource, out, 0, top=True)
    text = "".join(out)
    if _NOT_XML_CHAR.search(text):  # JSON strings may hold U+FFFE and the like, which XML 1.0 cannot
        raise NotRepresentable("a character that XML 1.0 cannot carry")
    return text.encode("utf-8")


class NotRepresentable(Exception):
    """The JSON has something the R4 definitions do not know (never stored: validation refuses it)."""


def _write_resource(resource: Any, out: list[str], depth: int, *, top: bool = False) -> None:
    if not isinstance(resource, dict) or not is_resource_type(str(resource.get("resourceType"))):
        raise NotRepresentable("not a resource")
    rtype = resource["resourceType"]
    out.append(f'<{rtype} xmlns="{FHIR_NS}">' if top else f'<{rtype}>')
    _write_children(resource, rtype, out, depth + 1, is_resource=True)
    out.append(f"</{rtype}>")


def _attrs(obj: dict[str, Any], table_name: str) -> str:
    parts = []
    if isinstance(obj.get("id"), str):
        parts.append(f' id="{xhtml.escape_attr(obj["id"])}"')
    if table_name == "Extension" and isinstance(obj.get("url"), str):
        parts.append(f' url="{xhtml.escape_attr(obj["url"])}"')
    return "".join(parts)


def _write_children(obj: dict[str, Any], table_name: str, out: list[str], depth: int,
                    *, is_resource: bool = False) -> None:
    if depth > MAX_DEPTH:
        raise NotRepresentable("nested too deeply")
    tables = load_tables()
    table = tables["tables"][table_name]
    order = _order()[table_name]
    known = set(order) | {"resourceType"} if is_resource else set(order)
    for key in obj:
        if key.lstrip("_") not in known:
            raise NotRepresentable(f"unknown element {table_name}.{key}")
    for name in order:
        if name not in obj and f"_{name}" not in obj:
            continue
        if not is_resource and (name == "id" or (name == "url" and table_name == "Extension")):
            continue  # attributes, written with the start tag
        type_name = table[name][0]
        values, extras = _as_lists(obj.get(name), obj.get(f"_{name}"))
        for value, extra in zip(values, extras, strict=True):
            if type_name == "xhtml":
                out.append(_narrative(value))
            elif type_name in tables["primitives"]:
                _write_primitive(name, value, extra, out, depth)
            elif type_name == "Resource":
                out.append(f"<{name}>")
                _write_resource(value, out, depth + 1)
                out.append(f"</{name}>")
            elif isinstance(value, dict):
                out.append(f"<{name}{_attrs(value, type_name)}>")
                _write_children(value, type_name, out, depth + 1)
                out.append(f"</{name}>")
            else:
                raise NotRepresentable(f"{table_name}.{name} is not an object")


def _as_lists(value: Any, extra: Any) -> tuple[list[Any], list[Any]]:
    values = value if isinstance(value, list) else ([] if value is None else [value])
    extras = extra if isinstance(extra, list) else ([] if extra is None else [extra])
    size = max(len(values), len(extras))
    return values + [None] * (size - len(values)), extras + [None] * (size - len(extras))


def _write_primitive(name: str, value: Any, extra: Any, out: list[str], depth: int) -> None:
    attrs = ""
    if isinstance(extra, dict) and isinstance(extra.get("id"), str):
        attrs += f' id="{xhtml.escape_attr(extra["id"])}"'
    if value is not None:
        attrs += f' value="{xhtml.escape_attr(_text(value))}"'
    extensions = extra.get("extension") if isinstance(extra, dict) else None
    if not extensions:
        if value is None and not attrs:
            return
        out.append(f"<{name}{attrs}/>")
        return
    out.append(f"<{name}{attrs}>")
    for ext in extensions:
        if not isinstance(ext, dict):
            raise NotRepresentable("an extension is not an object")
        out.append(f"<extension{_attrs(ext, 'Extension')}>")
        _write_children(ext, "Extension", out, depth + 1)
        out.append("</extension>")
    out.append(f"</{name}>")


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, RawNumber):
        return str.__str__(value)
    if isinstance(value, int | str):
        return str(value)
    raise NotRepresentable("a primitive value is not a string, number or boolean")


def _narrative(value: Any) -> str:
    """The stored div when it is safe XHTML; otherwise its text, escaped, so nothing unsafe is served."""
    if not isinstance(value, str):
        raise NotRepresentable("the narrative is not a string")
    try:
        div = xhtml.parse(value)
        xhtml.check(div)
    except errors.OperationOutcomeError:
        return f'<div xmlns="{xhtml.XHTML}">{xhtml.escape_text(value)}</div>'
    return xhtml.to_string(div)


def iter_types() -> Iterator[str]:
    """Every type and backbone name the XML converter knows (tests walk them)."""
    return iter(_order())
