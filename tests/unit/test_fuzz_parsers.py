"""Property: the parsers that take raw client input only fail in their documented ways.

The JSON body parser and validator, the search query parser, and the credentials parsers (bearer access
token, private_key_jwt client assertion, HTTP Basic header) are fed arbitrary and near-valid input;
the only exceptions allowed are the project's own rejections (OperationOutcomeError and its
SearchError, TokenError, OAuthError), which the web layer turns into 4xx answers.
(Over HTTP, with a real app: tests/integration/test_fuzz_no_500.py.)
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.jwk import ECKey

from fhirvault.adapters.keyfile import KeyFileProvider
from fhirvault.adapters.sqlite_store import SqliteStore
from fhirvault.domain.errors import OperationOutcomeError
from fhirvault.domain.r4 import resource_types
from fhirvault.domain.search.params import search_params
from fhirvault.domain.search.query import parse_search
from fhirvault.domain.validation import Validator
from fhirvault.fhir.router import _parse_body
from fhirvault.ports import WriteTx
from fhirvault.services.auth import AuthService, OAuthError, TokenError
from fhirvault.web.oauth import _basic

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
TOKEN_URL = "http://fhir.example/oauth2/token"

json_scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
                | st.text(max_size=30))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=15), c, max_size=5), max_leaves=30)


# -- JSON bodies ---------------------------------------------------------------------------------------------
def _r4_keys(rtype: str) -> st.SearchStrategy[str]:
    names = [n.split(":")[0] for n in search_params(rtype)] + ["id", "meta", "extension", "contained", "text",
                                                                "_id", "resourceType", "modifierExtension"]
    return st.sampled_from(names) | st.text(max_size=10)


@st.composite
def near_resources(draw: st.DrawFn) -> Any:
    rtype = draw(st.sampled_from(["Patient", "Observation", "Bundle", "Parameters", "Encounter"]))
    body: dict[str, Any] = {"resourceType": draw(st.sampled_from([rtype, rtype.lower(), "", 7]))}
    body.update(draw(st.dictionaries(_r4_keys(rtype), json_values, max_size=6)))
    if draw(st.booleans()):
        body["contained"] = [draw(near_resources()) if draw(st.booleans()) else draw(json_values)]
    return body


@FUZZ
@given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))  # big ints too
def test_body_parser_accepts_json_or_raises_an_outcome(body: bytes) -> None:
    try:
        _parse_body(body)
    except OperationOutcomeError as exc:
        assert exc.status == 400


@FUZZ
@given(near_resources() | json_values)
def test_validator_reports_issues_never_raises(resource: Any) -> None:
    if not isinstance(resource, dict):
        resource = {"resourceType": "Patient", "name": resource}
    for allow_unknown in (False, True):
        issues = Validator.default().validate(resource, allow_unknown_elements=allow_unknown)
        assert isinstance(issues, list)


# -- search queries --------------------------------------------------------------------------------------------
TYPES = sorted(t for t in resource_types() if t != "AuditEvent")
MODIFIERS = ["", ":exact", ":missing", ":not", ":contains", ":text", ":identifier", ":above", ":below",
             ":of-type", ":in", ":not-in", ":Patient", ":iterate", ":", "::", ":Nope"]
SPECIALS = ["_id", "_lastUpdated", "_sort", "_count", "_include", "_revinclude", "_summary", "_elements",
            "_total", "_has", "_format", "_type", "_text", "_content", "_list", "_query"]
value_parts = st.sampled_from(["eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap", "|", "\\|", ",", "\\,",
                               "$", "\\", "-", ".", "1e9999", "2020-02-30", "2020-13", "T25:00", "Z", "+14:00",
                               "http://x/Patient/1", "Patient/", "/_history/", "urn:uuid:", "*", ":", "%",
                               "9" * 30, "NaN", " "]) | st.text(max_size=8)


@st.composite
def search_names(draw: st.DrawFn, rtype: str) -> str:
    codes = sorted(search_params(rtype)) or ["_id"]
    name = draw(st.sampled_from(codes + SPECIALS) | st.text(max_size=12))
    if draw(st.integers(0, 4)) == 0:  # chain or reverse chain
        target = draw(st.sampled_from(TYPES))
        name = draw(st.sampled_from([f"{name}:{target}.{draw(st.sampled_from(sorted(search_params(target)) or ['x']))}",
                                     f"_has:{target}:{name}:{draw(st.text(max_size=6))}", f"{name}.{name}"]))
    return name + draw(st.sampled_from(MODIFIERS))


@st.composite
def searches(draw: st.DrawFn) -> tuple[str, list[tuple[str, str]]]:
    rtype = draw(st.sampled_from(["Patient", "Observation", "Encounter", "RiskAssessment", "ValueSet"])
                 | st.sampled_from(TYPES))
    params = draw(st.lists(st.tuples(search_names(rtype), st.lists(value_parts, max_size=6).map("".join)),
                           max_size=5))
    return rtype, params


@FUZZ
@given(searches(), st.booleans())
def test_search_parser_rejects_with_an_outcome(search: tuple[str, list[tuple[str, str]]], strict: bool) -> None:
    rtype, params = search
    try:
        parsed = parse_search(rtype, params, strict=strict, base_url="http://fhir.example/fhir", now_ms=0)
    except OperationOutcomeError as exc:
        assert 400 <= exc.status < 500, exc.status
    else:
        assert parsed.resource_type == rtype
        assert parsed.count is None or parsed.count >= 0


# -- credentials -----------------------------------------------------------------------------------------------
class FixedClock:
    def now_ms(self) -> int:
        return int(time.time() * 1000)


@pytest.fixture(scope="module")
def auth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[AuthService, str, ECKey]]:
    tmp: Path = tmp_path_factory.mktemp("auth")
    root = KeyFileProvider.create(tmp / "root.key")
    store = SqliteStore(tmp / "db")

    def setup(tx: WriteTx) -> None:
        AuthService.create_signing_key(tx, root)

    store.write_sync("init", setup)
    service = AuthService(store, root, FixedClock(), issuer="urn:test", tenant="default", token_ttl_seconds=60)
    key = ECKey.generate_key("P-384", parameters={"kid": "k1", "alg": "ES384"})
    client = service.register_client("jwt-client", "system/Patient.rs",
                                     jwks={"keys": [key.as_dict(private=False)]}, with_secret=False)
    yield service, client.client_id, key
    store.close()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@st.composite
def jwt_shaped(draw: st.DrawFn, claims: st.SearchStrategy[Any]) -> str:
    header = draw(st.fixed_dictionaries({}, optional={
        "alg": st.sampled_from(["none", "HS256", "RS256", "ES256", "ES384", "EdDSA", "", "NONE"]) | json_scalars,
        "typ": st.sampled_from(["at+jwt", "JWT"]) | json_scalars,
        "kid": st.text(max_size=10) | json_scalars,
        "crit": json_values, "jku": st.just("http://evil.example/jwks"),
        "jwk": json_values, "b64": st.booleans()}))
    parts = [_b64(json.dumps(header).encode()), _b64(json.dumps(draw(claims)).encode()),
             draw(st.sampled_from(["", _b64(b"x" * 96)]) | st.text(max_size=20))]
    extra = draw(st.lists(st.text(max_size=5), max_size=2))
    return ".".join(parts + extra)


claims_like = st.fixed_dictionaries({}, optional={
    k: json_scalars | json_values for k in ("iss", "sub", "aud", "exp", "nbf", "iat", "jti", "scope", "tenant",
                                            "client_id", "role", "fhirUser", "patient", "clearance")})


@FUZZ
@given(st.text(max_size=200) | jwt_shaped(claims_like | json_values))
def test_bearer_token_verification_only_raises_token_error(auth: tuple[AuthService, str, ECKey],
                                                           token: str) -> None:
    service, _, _ = auth
    with pytest.raises(TokenError):
        service.verify(token)


@FUZZ
@given(st.data())
def test_client_assertion_only_raises_oauth_error(auth: tuple[AuthService, str, ECKey], data: st.DataObject) -> None:
    service, client_id, key = auth
    now = int(time.time())
    good = {"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "exp": now + 60, "jti": "j"}
    claims = data.draw(st.fixed_dictionaries({}, optional={k: json_scalars | st.just(v) for k, v in good.items()}))
    claims.update(data.draw(st.dictionaries(st.sampled_from(["iss", "sub", "aud", "exp", "nbf", "jti"]),
                                            json_values, max_size=2)))
    if data.draw(st.booleans()):  # correctly signed with the registered key, the claims still fuzzed
        try:
            assertion = jwt.encode({"alg": "ES384", "kid": "k1"}, claims, key, algorithms=["ES384"])
        except (ValueError, TypeError):
            return  # joserfc refuses to encode it: nothing to send
    else:
        assertion = data.draw(jwt_shaped(st.just(claims)))
    form = {"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion}
    try:
        row, replay_key = service.authenticate_client(form, None, TOKEN_URL)
    except OAuthError as exc:
        assert exc.status in (400, 401)
    else:  # accepted: only a genuine, well-formed assertion from that client
        assert row.client_id == client_id and replay_key is not None
        assert claims["iss"] == claims["sub"] == client_id and claims["aud"] == TOKEN_URL


@FUZZ
@given(st.one_of(st.text(max_size=80), st.binary(max_size=60).map(lambda b: "Basic " + base64.b64encode(b).decode()),
                 st.text(max_size=40).map(lambda t: "Basic " + t),
                 st.text(max_size=40).map(lambda t: "basic " + base64.b64encode(t.encode()).decode())))
def test_basic_header_parser(header: str) -> None:
    try:
        parsed = _basic(header)
    except OAuthError as exc:
        assert exc.status == 401 and exc.error == "invalid_client"
    else:
        assert parsed is None or (isinstance(parsed[0], str) and isinstance(parsed[1], str))


def test_a_real_assertion_is_accepted(auth: tuple[AuthService, str, ECKey]) -> None:
    """The fixture is able to pass: the property above does reach the signature-checked path."""
    service, client_id, key = auth
    claims = {"iss": client_id, "sub": client_id, "aud": TOKEN_URL, "exp": int(time.time()) + 60, "jti": "ok"}
    assertion = jwt.encode({"alg": "ES384", "kid": "k1"}, claims, key, algorithms=["ES384"])
    form = {"client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": assertion}
    assert service.authenticate_client(form, None, TOKEN_URL)[0].client_id == client_id
    assert json.loads(base64.urlsafe_b64decode(assertion.split(".")[1] + "=="))["iss"] == client_id
