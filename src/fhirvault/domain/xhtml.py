"""The XHTML of a FHIR narrative (Narrative.div): safe parsing, checking and serialising.

R4 (narrative.html, txt-1/txt-2) allows only basic HTML formatting: the elements of HTML 4.0
chapters 7-11 and 12 (less <link>), images and style attributes; never scripts, forms,
frames, event handlers or active links. The div must have some non-whitespace content.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from collections import OrderedDict
from xml.etree.ElementTree import Element, XMLParser

from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring

from fhirvault.domain import errors

XHTML = "http://www.w3.org/1999/xhtml"
XML_NS = "http://www.w3.org/XML/1998/namespace"
_XHTML_TAG = "{" + XHTML + "}"
MAX_DEPTH = 64

ELEMENTS = frozenset({
    "a", "abbr", "acronym", "address", "b", "bdo", "big", "blockquote", "br", "caption", "cite", "code",
    "col", "colgroup", "dd", "del", "dfn", "div", "dl", "dt", "em", "h1", "h2", "h3", "h4", "h5", "h6",
    "hr", "i", "img", "ins", "kbd", "li", "ol", "p", "pre", "q", "samp", "small", "span", "strong",
    "sub", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "tr", "tt", "ul", "var",
})
ATTRIBUTES = frozenset({
    "abbr", "accesskey", "align", "alt", "axis", "bgcolor", "border", "cellhalign", "cellpadding",
    "cellspacing", "cellvalign", "char", "charoff", "charset", "cite", "class", "colspan", "compact",
    "coords", "datetime", "dir", "frame", "headers", "height", "href", "hreflang", "hspace", "id", "lang",
    "longdesc", "name", "nowrap", "rel", "rev", "rowspan", "rules", "scope", "shape", "span", "src",
    "start", "style", "summary", "tabindex", "title", "type", "valign", "value", "vspace", "width",
    "{" + XML_NS + "}lang",
})
# Links and images may point at web pages, fragments, other resources or inline images, never
# at script or markup that a browser would run.
_SAFE_URL = re.compile(r"^(?:https?:|mailto:|urn:|#|data:image/(?:png|gif|jpeg|webp);|[^:]*$)", re.IGNORECASE)
_STYLE_BAD = re.compile(r"expression\s*\(|url\s*\(|javascript:|@import|behavior\s*:", re.IGNORECASE)
_ALLOWED_TAGS = frozenset(_XHTML_TAG + name for name in ELEMENTS)
_BAD_ELEMENT = "only basic HTML formatting elements are allowed (no script, form, frame, object, style)."


def _bad(message: str) -> errors.OperationOutcomeError:
    return errors.bad_request(f"Narrative (Narrative.div): {message}", "Narrative.div")


def check(div: Element) -> None:
    """Raise a 400 unless ``div`` is a safe, non-empty XHTML narrative div."""
    message = problem(div)
    if message is not None:
        raise _bad(message)


def problem(div: Element) -> str | None:
    """Why ``div`` is not a safe, non-empty XHTML narrative div; None when it is."""
    if div.tag != _XHTML_TAG + "div":
        return "the narrative must be a <div> in the XHTML namespace."
    message = _problem(div, 0)
    if message is None and not "".join(div.itertext()).strip() and div.find(".//" + _XHTML_TAG + "img") is None:
        return "the narrative must have some non-whitespace content."
    return message


_NOT_WELL_FORMED = "not well-formed XHTML."
_CACHE_SIZE = 4096  # verdicts kept; realistic data repeats its narratives
_cache: OrderedDict[bytes, str | None] = OrderedDict()
_cache_lock = threading.Lock()
# Keys are keyed digests: the cache holds no narrative text, and its keys cannot be
# matched against a guessed narrative without this process's key.
_cache_key = os.urandom(16)


def text_problem(text: str) -> str | None:
    """problem() of a JSON narrative string (used by the JSON validation too).

    The verdict is remembered by digest: ingest validates every narrative, and real data
    repeats them.
    """
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return _NOT_WELL_FORMED
    key = hashlib.blake2b(data, digest_size=16, key=_cache_key).digest()
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    try:
        verdict = problem(_parse_bytes(data))
    except errors.OperationOutcomeError:
        verdict = _NOT_WELL_FORMED
    with _cache_lock:
        _cache[key] = verdict
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return verdict


def clear_cache() -> None:
    """Forget the remembered verdicts (benchmarks measure the cold path with it)."""
    with _cache_lock:
        _cache.clear()


def _problem(elem: Element, depth: int) -> str | None:
    if depth > MAX_DEPTH:
        return "nested too deeply."
    if elem.tag not in _ALLOWED_TAGS:
        return _BAD_ELEMENT
    if elem.attrib:
        for name, value in elem.attrib.items():
            message = _attribute_problem(name, value)
            if message is not None:
                return message
    for child in elem:
        message = _problem(child, depth + 1)
        if message is not None:
            return message
    return None


def _attribute_problem(name: str, value: str) -> str | None:
    if name not in ATTRIBUTES:
        return "only basic HTML attributes are allowed (no event handlers)."
    if name in ("href", "src", "longdesc", "cite") and not _SAFE_URL.match(value.strip()):
        return "links and images must use http(s), mailto, urn, fragment, relative or image data URLs."
    if name == "style" and _STYLE_BAD.search(value):
        return "style attributes may not load or run anything."
    return None


def parse(text: str) -> Element:
    """The div of a JSON narrative string; elements without a namespace are taken as XHTML."""
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        raise _bad(_NOT_WELL_FORMED) from None
    return _parse_bytes(data)


def _parse_bytes(data: bytes) -> Element:
    try:
        if _dtd_free(data):
            # No DTD (see _dtd_free): the C parser, several times faster than defusedxml's.
            parser = XMLParser()  # noqa: S314
            parser.feed(data)
            root = parser.close()
        else:
            root = fromstring(data, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except (ParseError, DefusedXmlException, ValueError):
        raise _bad(_NOT_WELL_FORMED) from None
    for elem in root.iter():
        if isinstance(elem.tag, str) and not elem.tag.startswith("{"):
            elem.tag = _XHTML_TAG + elem.tag
    return root


def _dtd_free(data: bytes) -> bool:
    """Whether expat reads `data` as UTF-8 with no document type declaration.

    Without a DTD there are no entity declarations nor external references, so what
    defusedxml guards against cannot happen and the standard parser gives the same tree and
    the same errors. An XML declaration (which may name another encoding) or a NUL byte
    (which may make expat guess UTF-16) could hide a DTD from this byte search.
    """
    return b"<!DOCTYPE" not in data and b"<?xml" not in data and b"\x00" not in data


def to_string(div: Element) -> str:
    """The div serialised with the XHTML namespace as its default namespace (JSON and XML alike)."""
    out: list[str] = []
    _write(div, out, top=True)
    return "".join(out)


def _write(elem: Element, out: list[str], *, top: bool) -> None:
    name = elem.tag[len(_XHTML_TAG):] if elem.tag.startswith(_XHTML_TAG) else elem.tag
    out.append("<" + name)
    if top:
        out.append(f' xmlns="{XHTML}"')
    for key, value in elem.attrib.items():
        attr = "xml:lang" if key == "{" + XML_NS + "}lang" else key
        out.append(f' {attr}="{escape_attr(value)}"')
    if elem.text is None and len(elem) == 0:
        out.append("/>")
    else:
        out.append(">")
        out.append(escape_text(elem.text or ""))
        for child in elem:
            _write(child, out, top=False)
            out.append(escape_text(child.tail or ""))
        out.append(f"</{name}>")


def escape_text(value: str) -> str:
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def escape_attr(value: str) -> str:
    return (escape_text(value).replace('"', "&quot;").replace("\n", "&#10;").replace("\r", "&#13;")
            .replace("\t", "&#9;"))
