"""S3-compatible object storage as a backup target (AWS S3, Swift s3api, MinIO, Ceph RGW…).

Every object is one PUT: S3 makes it visible whole or not at all, so a cut
upload can never pass for a complete backup. Content-MD5 makes the server
reject bytes corrupted in flight; an MD5 kept in the object's metadata lets
``get`` reject a corrupted download. Where the bucket has Object Lock enabled,
retention is requested in COMPLIANCE mode, which nobody, not even the root
account or ransomware holding our credentials, can shorten or lift.

Errors are reported with the target's URL, the operation and the S3 error
code only: S3 error bodies can echo the access key and signature.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    PartialCredentialsError,
)

from fhirvault.backup.target import (
    EEA_COUNTRIES,
    TargetError,
    TargetImmutable,
    TargetNotFound,
    TargetUnavailable,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)

# ISO 3166-1 alpha-2 officially assigned codes (249). "UK" and "EU" are not among them.
_ISO_CODES = """AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ
    BR BS BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO
    DZ EC EE EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU
    GW GY HK HM HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW
    KY KZ LA LB LC LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU
    MV MW MX MY MZ NA NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW
    PY QA RE RO RS RU RW SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF
    TG TH TJ TK TL TM TN TO TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA
    ZM ZW"""
ISO_COUNTRIES = frozenset(_ISO_CODES.split())

_MAX_SINGLE_PUT = 5 * 1024**3  # S3's limit for one PUT; backup objects are far smaller
_MD5_META = "fhirvault-md5"  # user metadata (x-amz-meta-…) checked by get()
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_UNAVAILABLE_CODES = frozenset({"SlowDown", "ServiceUnavailable", "RequestTimeout", "InternalError"})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_LOCK_ABSENT_CODES = frozenset(
    {"ObjectLockConfigurationNotFoundError", "NotImplemented", "MethodNotAllowed", "InvalidRequest"}
)


def validate_location(location: str, *, allow_outside_eea: bool = False) -> str:
    """The declared country, normalised; ``ValueError`` if missing, unknown or outside the EEA."""
    code = (location or "").strip().upper()
    if not code:
        raise ValueError("a backup target must declare its location (ISO 3166-1 alpha-2 country code)")
    if code not in ISO_COUNTRIES:
        raise ValueError(f"backup target location {location!r} is not an ISO 3166-1 alpha-2 country code")
    if code not in EEA_COUNTRIES and not allow_outside_eea:
        raise ValueError(
            f"backup target location {code} is outside the EEA; "
            "health data may only go there with an explicit override (allow_outside_eea)"
        )
    return code


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix")``."""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError("an S3 target URL looks like s3://bucket/prefix (credentials are configured apart)")
    return parts.netloc, parts.path.strip("/")


@dataclass(frozen=True)
class S3CheckResult:
    """What ``S3Target.check`` found out about the bucket."""

    object_lock: bool


class S3Target:
    """A bucket prefix on S3-compatible storage, implementing ``BackupTarget``."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None,
        region: str | None,
        access_key_id: str | None,
        secret_access_key: str | None,
        location: str,
        object_lock_days: int | None = None,
        allow_outside_eea: bool = False,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 5,
        list_page_size: int = 1000,
    ) -> None:
        self._location = validate_location(location, allow_outside_eea=allow_outside_eea)
        if not _BUCKET_RE.match(bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        if endpoint_url is not None:
            parts = urlsplit(endpoint_url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("the S3 endpoint must be an http(s) URL")
            if parts.username is not None or parts.password is not None:
                # Credentials in the URL would end up in logs and error messages.
                raise ValueError("the S3 endpoint URL must not contain credentials")
        if (access_key_id is None) != (secret_access_key is None):
            raise ValueError("give both the S3 access key id and the secret access key, or neither")
        if object_lock_days is not None and object_lock_days <= 0:
            raise ValueError("object_lock_days must be positive")
        if max_attempts < 1 or not 1 <= list_page_size <= 1000:
            raise ValueError("max_attempts must be ≥ 1 and list_page_size within 1..1000")
        self._bucket = bucket
        self._root = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self._object_lock_days = object_lock_days
        self._max_attempts = max_attempts
        self._page_size = list_page_size
        self._lock: bool | None = None  # Object Lock on the bucket, detected once
        config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"mode": "standard", "total_max_attempts": max_attempts},  # first try included
            # Path style works with every S3-compatible server; AWS keeps its default.
            s3={"addressing_style": "path" if endpoint_url else "auto"},
            # We send Content-MD5 ourselves; newer botocore's default trailing CRC32
            # (aws-chunked) is not understood by several S3-compatible servers.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        # A session of its own: boto3's default session is not thread-safe to set up.
        session = boto3.session.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            region_name=region or "us-east-1",
        )
        self._s3: S3Client = session.client("s3", endpoint_url=endpoint_url, config=config)

    @property
    def url(self) -> str:
        return f"s3://{self._bucket}/{self._root.rstrip('/')}" if self._root else f"s3://{self._bucket}"

    @property
    def location(self) -> str:
        return self._location

    def __repr__(self) -> str:
        return f"S3Target({self.url!r}, location={self._location!r})"

    # -- BackupTarget -----------------------------------------------------

    def put(self, key: str, data: bytes, *, retain_until_ms: int | None = None) -> None:
        full = self._key(key)
        if len(data) > _MAX_SINGLE_PUT:
            raise ValueError(f"{self.url}: object {key} is larger than one S3 PUT allows")
        digest = hashlib.md5(data, usedforsecurity=False).digest()
        extra: dict[str, Any] = {}
        until = self._retain_until(retain_until_ms)
        if until is not None and self.object_lock_enabled():
            extra = {"ObjectLockMode": "COMPLIANCE", "ObjectLockRetainUntilDate": until}
        try:
            self._s3.put_object(
                Bucket=self._bucket,
                Key=full,
                Body=data,
                ContentMD5=base64.b64encode(digest).decode(),
                Metadata={_MD5_META: digest.hex()},
                **extra,
            )
        except (BotoCoreError, ClientError) as e:
            self._raise("put", key, e)

    def get(self, key: str) -> bytes:
        full = self._key(key)
        # botocore retries requests, not the reading of a response body: a
        # connection cut mid-download (or a corrupted one) is retried here.
        for attempt in range(1, self._max_attempts + 1):
            try:
                resp = self._s3.get_object(Bucket=self._bucket, Key=full)
            except (BotoCoreError, ClientError) as e:
                self._raise("get", key, e)  # botocore has retried already
            try:
                data = resp["Body"].read()
            except (HTTPClientError, ConnectionError, IncompleteReadError, OSError) as e:
                if attempt == self._max_attempts:
                    self._raise("get", key, e)
                time.sleep(min(0.2 * 2**attempt, 5.0))
                continue
            expected = resp.get("Metadata", {}).get(_MD5_META)
            if expected is None or hashlib.md5(data, usedforsecurity=False).hexdigest() == expected:
                return data
            if attempt == self._max_attempts:
                raise TargetError(f"{self.url}: get {key}: the object's bytes do not match their MD5")
            log.warning("%s: get %s returned corrupted bytes; retrying", self.url, key)
        raise AssertionError("unreachable")  # pragma: no cover

    def exists(self, key: str) -> bool:
        try:
            self._s3.head_object(Bucket=self._bucket, Key=self._key(key))
        except ClientError as e:
            if _code(e) in _NOT_FOUND_CODES:
                return False
            self._raise("exists", key, e)
        except BotoCoreError as e:
            self._raise("exists", key, e)
        return True

    def list(self, prefix: str) -> Iterator[str]:
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket,
            Prefix=self._root + prefix,
            PaginationConfig={"PageSize": self._page_size},
        )
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    yield obj["Key"][len(self._root) :]
        except (BotoCoreError, ClientError) as e:
            self._raise("list", prefix, e)

    def delete(self, key: str) -> None:
        full = self._key(key)
        if not self.object_lock_enabled():
            try:
                self._s3.delete_object(Bucket=self._bucket, Key=full)
            except (BotoCoreError, ClientError) as e:
                self._raise("delete", key, e)
            return
        # Object Lock implies versioning: a plain DELETE would only hide the object
        # behind a delete marker. Removing it means removing each version, which
        # the bucket refuses while a version is retained.
        retained = False
        for version_id in self._versions(full, key):
            try:
                self._s3.delete_object(Bucket=self._bucket, Key=full, VersionId=version_id)
            except ClientError as e:
                if _code(e) == "AccessDenied" and self._is_retained(full, version_id):
                    retained = True
                    continue
                self._raise("delete", key, e)
            except BotoCoreError as e:
                self._raise("delete", key, e)
        if retained:
            raise TargetImmutable(f"{self.url}: {key} is under retention (object lock) and cannot be deleted yet")

    # -- configuration checks --------------------------------------------------

    def object_lock_enabled(self) -> bool:
        """Whether the bucket has Object Lock enabled (asked once, then remembered)."""
        if self._lock is None:
            try:
                conf = self._s3.get_object_lock_configuration(Bucket=self._bucket)
                self._lock = conf.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled") == "Enabled"
            except ClientError as e:
                if _code(e) == "AccessDenied":
                    # The bucket's default retention (if any) still applies server-side.
                    log.warning("%s: not allowed to read the Object Lock configuration; "
                                "assuming none", self.url)
                elif _code(e) not in _LOCK_ABSENT_CODES and _status(e) != 404:
                    self._raise("object-lock check", "", e)
                self._lock = False
            except BotoCoreError as e:
                self._raise("object-lock check", "", e)
        return self._lock

    def check(self) -> S3CheckResult:
        """Verify the bucket is reachable and writable: write, read back and remove a probe."""
        try:
            self._s3.head_bucket(Bucket=self._bucket)
        except ClientError as e:
            if _status(e) == 404:
                raise TargetError(f"{self.url}: the bucket does not exist") from None
            self._raise("check", "", e)
        except BotoCoreError as e:
            self._raise("check", "", e)
        probe = f".fhirvault-check/{uuid.uuid4().hex}"
        payload = uuid.uuid4().bytes * 64
        self.put(probe, payload)
        if self.get(probe) != payload:
            raise TargetError(f"{self.url}: the probe object did not read back identically")
        # The bucket's default retention applies to the probe too: harmless.
        with contextlib.suppress(TargetImmutable):
            self.delete(probe)
        lock = self.object_lock_enabled()
        if self._object_lock_days and not lock:
            log.warning("%s: object lock requested but the bucket does not have Object Lock "
                        "enabled; backups there are deletable with the server's credentials", self.url)
        return S3CheckResult(object_lock=lock)

    # -- helpers --------------------------------------------------------

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
            raise ValueError(f"invalid target key {key!r}")
        return self._root + key

    def _retain_until(self, retain_until_ms: int | None) -> datetime | None:
        """For a put that asks for retention: the later of its date and now + object_lock_days.

        Puts that ask for none (leases, probes) stay deletable: locking them
        would only leave litter behind.
        """
        if retain_until_ms is None:
            return None
        now = datetime.now(UTC)
        until = datetime.fromtimestamp(retain_until_ms / 1000, UTC)
        if self._object_lock_days:
            until = max(until, now + timedelta(days=self._object_lock_days))
        return until if until > now else None  # S3 refuses dates in the past

    def _versions(self, full: str, key: str) -> Iterator[str]:
        pages = self._s3.get_paginator("list_object_versions").paginate(Bucket=self._bucket, Prefix=full)
        try:
            for page in pages:
                for entry in [*page.get("Versions", []), *page.get("DeleteMarkers", [])]:
                    if entry.get("Key") == full and "VersionId" in entry:
                        yield entry["VersionId"]
        except (BotoCoreError, ClientError) as e:
            self._raise("delete", key, e)

    def _is_retained(self, full: str, version_id: str) -> bool:
        try:
            head = self._s3.head_object(Bucket=self._bucket, Key=full, VersionId=version_id)
        except (BotoCoreError, ClientError):
            return False
        until = head.get("ObjectLockRetainUntilDate")
        held = head.get("ObjectLockLegalHoldStatus") == "ON"
        return held or (until is not None and until > datetime.now(UTC))

    def _raise(self, op: str, key: str, e: BotoCoreError | ClientError | OSError) -> NoReturn:
        """Translate a boto error into a target error that carries no server text."""
        what = f"{self.url}: {op} {key}".rstrip()
        if isinstance(e, ClientError):
            code, status = _code(e), _status(e)
            if code in _NOT_FOUND_CODES or (status == 404 and code not in ("NoSuchBucket",)):
                raise TargetNotFound(f"{what}: not found") from None
            if status >= 500 or code in _UNAVAILABLE_CODES:
                log.warning("%s: unavailable after retries (%s, HTTP %s)", what, code, status)
                raise TargetUnavailable(f"{what}: the target is unavailable ({code}, HTTP {status})") from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied") or status == 403:
                raise TargetError(f"{what}: access refused ({code}); check the credentials and bucket policy") from None
            if code == "NoSuchBucket":
                raise TargetError(f"{what}: the bucket does not exist") from None
            raise TargetError(f"{what}: refused by the target ({code}, HTTP {status})") from None
        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            raise TargetError(f"{what}: no S3 credentials configured") from None
        if isinstance(e, HTTPClientError | ConnectionError | IncompleteReadError | OSError):
            log.warning("%s: unreachable after retries (%s)", what, type(e).__name__)
            raise TargetUnavailable(f"{what}: the target is unreachable ({type(e).__name__})") from None
        raise TargetError(f"{what}: failed ({type(e).__name__})") from None


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


def _status(e: ClientError) -> int:
    return int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
