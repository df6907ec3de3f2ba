"""xhtml.parse (the standard C parser when no DTD can be hidden in the text), the faster
allow-list walk and text_problem's verdict cache give the trees and verdicts of the previous
implementation (defusedxml for every narrative), kept here verbatim as the reference, for
well-formed, broken and hostile narratives."""

from __future__ import annotations

from xml.etree.ElementTree import Element

import pytest
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError, fromstring
from hypothesis import given, settings
from hypothesis import strategies as st

from fhirvault.domain import errors, xhtml

XMLNS = ' xmlns="http://www.w3.org/1999/xhtml"'
_TAG = "{http://www.w3.org/1999/xhtml}"
_BROKEN = "not well-formed XHTML."


def reference_parse(text: str) -> Element | None:
    try:
        root = fromstring(text.encode("utf-8"), forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except (ParseError, DefusedXmlException, ValueError):
        return None
    for elem in root.iter():
        if isinstance(elem.tag, str) and not elem.tag.startswith("{"):
            elem.tag = _TAG + elem.tag
    return root


def reference_walk(elem: Element, depth: int) -> str | None:
    if depth > xhtml.MAX_DEPTH:
        return "nested too deeply."
    if not elem.tag.startswith(_TAG) or elem.tag[len(_TAG):] not in xhtml.ELEMENTS:
        return "only basic HTML formatting elements are allowed (no script, form, frame, object, style)."
    for name, value in elem.attrib.items():
        if name not in xhtml.ATTRIBUTES:
            return "only basic HTML attributes are allowed (no event handlers)."
        if name in ("href", "src", "longdesc", "cite") and not xhtml._SAFE_URL.match(value.strip()):
            return "links and images must use http(s), mailto, urn, fragment, relative or image data URLs."
        if name == "style" and xhtml._STYLE_BAD.search(value):
            return "style attributes may not load or run anything."
    for child in elem:
        message = reference_walk(child, depth + 1)
        if message is not None:
            return message
    return None


def tree_verdict(text: str) -> str | None:
    """The previous text_problem."""
    div = reference_parse(text)
    if div is None:
        return _BROKEN
    if div.tag != _TAG + "div":
        return "the narrative must be a <div> in the XHTML namespace."
    message = reference_walk(div, 0)
    if message is None and not "".join(div.itertext()).strip() and div.find(".//" + _TAG + "img") is None:
        return "the narrative must have some non-whitespace content."
    return message


def same_tree(text: str) -> None:
    """parse() builds the tree (or refuses the text) as the defusedxml parse did."""
    expected = reference_parse(text)
    try:
        got: Element | None = xhtml.parse(text)
    except errors.OperationOutcomeError:
        got = None
    if expected is None or got is None:
        assert got is expected
    else:
        assert xhtml.to_string(got) == xhtml.to_string(expected)


def scan_verdict(text: str) -> str | None:
    xhtml.clear_cache()
    first = xhtml.text_problem(text)
    assert xhtml.text_problem(text) == first  # the cached verdict is the same
    return first


CASES = [
    f"<div{XMLNS}>Jane Doe</div>",
    "<div>no namespace</div>",
    f"<div{XMLNS}>   </div>",
    f"<div{XMLNS}>&#160;</div>",
    f"<div{XMLNS}><img src=\"x.png\"/></div>",
    f"<div{XMLNS}><p> </p><br/></div>",
    f"<div{XMLNS}><![CDATA[ text ]]></div>",
    f"<div{XMLNS}><!-- c --><?pi x?>t</div>",
    f"<div{XMLNS}>&amp;&lt;</div>",
    f"<div{XMLNS}>&nbsp;</div>",
    f"<div{XMLNS}>t</div><p/>",
    f"<div{XMLNS}>t",
    f"<div{XMLNS}><p>t</div>",
    "",
    "   ",
    "\ud800",
    f"<div{XMLNS}>\ud800</div>",
    '<?xml version="1.0"?><div>t</div>',
    '<?xml version="1.0" encoding="ISO-8859-1"?><div>t\u00e9</div>',
    "\ufeff<div>t</div>",
    '<!DOCTYPE div [<!ENTITY x "y">]><div>&x;</div>',
    '<!DOCTYPE div SYSTEM "http://example.org/x.dtd"><div>t</div>',
    '<div><!-- <!DOCTYPE x> -->t</div>',
    '<div>&lt;!DOCTYPE x&gt; <![CDATA[<?xml ?>]]></div>',
    '<div><?xml-stylesheet href="x"?>t</div>',
    '<?xml version="1.0" encoding="cp037"?>\x4c\x84\x89\xa5\x6e',
    "<\x00d\x00i\x00v\x00>\x00t\x00<\x00/\x00d\x00i\x00v\x00>\x00",
    "<div>t\x00</div>",
    '<div>&#0;</div>',
    f"<span{XMLNS}>t</span>",
    '<div xmlns="http://example.org/other">t</div>',
    '<x:div xmlns:x="http://www.w3.org/1999/xhtml">t</x:div>',
    f"<div{XMLNS}><x:p xmlns:x=\"urn:x\">t</x:p></div>",
    f"<div{XMLNS}><y:p>t</y:p></div>",
    f"<div{XMLNS}><script>alert(1)</script></div>",
    f"<div{XMLNS}><p onclick=\"x()\">t</p></div>",
    f"<div{XMLNS}><a href=\" javascript:alert(1)\">t</a></div>",
    f"<div{XMLNS}><a href=\"JaVaScRiPt:alert(1)\">t</a></div>",
    f"<div{XMLNS}><img src=\"data:text/html;base64,AA\"/>t</div>",
    f"<div{XMLNS}><img src=\"data:image/png;base64,AA\"/></div>",
    f"<div{XMLNS}><p style=\"background:url(x)\">t</p></div>",
    f"<div{XMLNS}><p style=\"width: expression (1)\">t</p></div>",
    f"<div{XMLNS}><p style=\"color:red\" class=\"a\" xml:lang=\"fr\">t</p></div>",
    f"<div{XMLNS}><p x:title=\"a\" xmlns:x=\"urn:x\">t</p></div>",
    f"<div{XMLNS} onload=\"x()\"><script/></div>",
    f"<div{XMLNS}><script/><p onclick=\"x\">t</p></div>",
    f"<div{XMLNS}><p a=\"1\" a=\"2\">t</p></div>",
    f"<div{XMLNS}>" + "<span>" * 70 + "t" + "</span>" * 70 + "</div>",
    f"<div{XMLNS}>" + "<span>" * 64 + "t" + "</span>" * 64 + "</div>",
    f"<div{XMLNS}>" + "<span>" * 65 + "t" + "</span>" * 65 + "</div>",
    f"<div{XMLNS}>" + "<span>" * 70 + "t" + "</span>" * 69 + "</div>",
]


@pytest.mark.parametrize("text", CASES)
def test_scan_gives_the_tree_verdict(text: str) -> None:
    assert scan_verdict(text) == tree_verdict(text)
    same_tree(text)


def test_hostile_narratives_are_still_refused() -> None:
    assert xhtml.text_problem(f"<div{XMLNS}><script>alert(1)</script></div>") is not None
    assert xhtml.text_problem(f"<div{XMLNS}><a href=\"javascript:x\">t</a></div>") is not None
    assert xhtml.text_problem(f"<div{XMLNS}><p onmouseover=\"x\">t</p></div>") is not None
    assert xhtml.text_problem(f"<div{XMLNS}><p>safe</p></div>") is None


def test_cache_is_bounded_and_keeps_no_text(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xhtml, "_CACHE_SIZE", 8)
    xhtml.clear_cache()
    for i in range(20):
        xhtml.text_problem(f"<div{XMLNS}>patient {i}</div>")
    assert len(xhtml._cache) == 8
    assert all(type(k) is bytes and len(k) == 16 and b"patient" not in k for k in xhtml._cache)


_NAMES = st.sampled_from(["div", "p", "span", "b", "img", "a", "table", "tr", "td", "br",
                          "script", "form", "x:p", "h:b", "iframe"])
_ATTRS = st.sampled_from(["href", "src", "style", "class", "onclick", "cite", "longdesc",
                          "xml:lang", "x:title", "title", "xmlns:x", "xmlns", "id"])
_VALUES = st.sampled_from(["", " ", "x.png", "http://a/b", "javascript:x", " JAVASCRIPT:x",
                           "data:image/gif;x", "data:text/html,x", "#f", "mailto:a@b",
                           "urn:x", "color:red", "url(x)", "expression(1)", "@import x",
                           "behavior: x", "urn:y", "http://www.w3.org/1999/xhtml",
                           "&amp;", "&lt;", "a&quot;b"])
_TEXTS = st.sampled_from(["", " ", "\n\t", "t", "&#160;", "&amp;", "<![CDATA[ ]]>",
                          "<![CDATA[x]]>", "<!--c-->", "<?pi d?>", "\u00e9", "\u3000", "t"])


@st.composite
def _fragment(draw: st.DrawFn, depth: int = 0) -> str:
    parts: list[str] = [draw(_TEXTS)]
    for _ in range(draw(st.integers(0, 3 if depth < 3 else 0))):
        name = draw(_NAMES)
        attrs = "".join(
            f' {draw(_ATTRS)}="{draw(_VALUES)}"' for _ in range(draw(st.integers(0, 2)))
        )
        inner = draw(_fragment(depth + 1))
        parts.append(f"<{name}{attrs}>{inner}</{name}>" if draw(st.booleans()) else f"<{name}{attrs}/>")
        parts.append(draw(_TEXTS))
    return "".join(parts)


@st.composite
def _narrative(draw: st.DrawFn) -> str:
    root = draw(st.sampled_from(["div", "div", "div", "p", "x:div"]))
    ns = draw(st.sampled_from([XMLNS, XMLNS, "", ' xmlns="urn:other"']))
    ns += draw(st.sampled_from([' xmlns:x="urn:x"', ' xmlns:x="http://www.w3.org/1999/xhtml"']))
    ns += ' xmlns:h="http://www.w3.org/1999/xhtml"'
    text = f"<{root}{ns}>{draw(_fragment())}</{root}>"
    if draw(st.integers(0, 5)) == 0:  # break it somewhere
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(["", "<", ">", "&", "</p>", "\x01", "&bad;", "<y:b/>"])) + text[at + 1 :]
    return text


@settings(max_examples=600, deadline=None)
@given(_narrative())
def test_scan_equals_tree_on_generated_narratives(text: str) -> None:
    assert scan_verdict(text) == tree_verdict(text)
    same_tree(text)
