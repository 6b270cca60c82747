"""The JSON of etcd v3's gateway: request bodies, replies as dataclasses, errors as pxfs errors.

The gateway accepts etcd's gRPC requests as JSON, with bytes fields in base64 and 64-bit integers
as decimal strings, and leaves out every field that has its zero value. A call that fails returns
a body with the gRPC status code, which `error_from_body` maps to a pxfs error.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any

import httpx

from pxfs.errors import (
    AuthenticationFailed,
    InternalError,
    InvalidArgument,
    NoSpace,
    NotFound,
    PermissionDenied,
    ProtocolError,
    PxfsError,
    Unavailable,
)

log = logging.getLogger(__name__)

#: gRPC status codes in the gateway's error bodies, and the pxfs error for each.
_GRPC_ERRORS: dict[int, type[PxfsError]] = {
    1: Unavailable,  # CANCELLED: "the client connection is closing" while etcd shuts down
    3: InvalidArgument,  # INVALID_ARGUMENT, such as a duplicate key in a transaction
    4: Unavailable,  # DEADLINE_EXCEEDED
    5: NotFound,  # NOT_FOUND: an unknown or expired lease
    7: PermissionDenied,  # PERMISSION_DENIED
    8: NoSpace,  # RESOURCE_EXHAUSTED: "mvcc: database space exceeded"
    11: InvalidArgument,  # OUT_OF_RANGE: a compacted or future revision
    14: Unavailable,  # UNAVAILABLE: no leader, or the request timed out inside etcd
    16: AuthenticationFailed,  # UNAUTHENTICATED
}
#: The codes that mean this member cannot serve now, though another member may.
_GRPC_TRY_ANOTHER_MEMBER = {1, 14}


@dataclass(frozen=True)
class KeyValue:
    """One key as etcd stores it, with its revisions and lease."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class RangeResult:
    """The keys of a range read and the store revision it was served at."""

    kvs: list[KeyValue]
    revision: int
    count: int
    more: bool


@dataclass(frozen=True)
class PutResult:
    """The store revision after a put, and the previous value when it was requested."""

    revision: int
    prev_kv: KeyValue | None


@dataclass(frozen=True)
class DeleteResult:
    """The number of keys a delete removed, and their values when they were requested."""

    revision: int
    deleted: int
    prev_kvs: list[KeyValue]


OpResult = RangeResult | PutResult | DeleteResult


@dataclass(frozen=True)
class TxnResult:
    """Whether a transaction's comparisons held, and the result of each operation it ran."""

    succeeded: bool
    revision: int
    responses: list[OpResult]


@dataclass(frozen=True)
class Lease:
    """A granted lease, with its id and the TTL in seconds that etcd chose."""

    id: int
    ttl: int


@dataclass(frozen=True)
class Compare:
    """One comparison of a transaction: `target` of `key` compared with `value`.

    `target` is "VERSION", "CREATE", "MOD", "VALUE" or "LEASE" (which revision or field of the
    key). `result` is "EQUAL", "NOT_EQUAL", "GREATER" or "LESS".
    """

    key: bytes
    target: str
    result: str
    value: int | bytes

    def to_json(self) -> dict[str, Any]:
        """Encode the comparison for the gateway."""
        fields = {"VERSION": "version", "CREATE": "create_revision", "MOD": "mod_revision"}
        body: dict[str, Any] = {"key": _b64(self.key), "target": self.target}
        body["result"] = self.result
        if self.target == "VALUE":
            assert isinstance(self.value, bytes)
            body["value"] = _b64(self.value)
        elif self.target == "LEASE":
            body["lease"] = str(self.value)
        else:
            body[fields[self.target]] = str(self.value)
        return body


def mod_revision_is(key: bytes, revision: int) -> Compare:
    """Build a comparison that `key` was last modified at `revision` (0 matches a missing key)."""
    return Compare(key, "MOD", "EQUAL", revision)


def key_missing(key: bytes) -> Compare:
    """Build a comparison that `key` does not exist, which etcd tests as create revision 0."""
    return Compare(key, "CREATE", "EQUAL", 0)


def prefix_end(prefix: bytes) -> bytes:
    """Return the range end that selects every key starting with `prefix`."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    # For an empty prefix or one of only 0xff bytes, the range end "\0" makes etcd select every
    # key from the start key on.
    return b"\0"


def prefix_range(prefix: bytes) -> tuple[bytes, bytes]:
    """Return the key and range end that select every key starting with `prefix`."""
    # etcd rejects an empty key, so an empty prefix becomes the range of every key from "\0" on.
    return (prefix or b"\0"), prefix_end(prefix)


@dataclass(frozen=True)
class Get:
    """A range read inside a transaction: `key`, or [key, range_end) when range_end is set."""

    key: bytes
    range_end: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        """Encode the operation for the gateway."""
        return {"request_range": encode_range_request(self.key, self.range_end)}


@dataclass(frozen=True)
class Put:
    """A put inside a transaction, attached to `lease` unless it is 0."""

    key: bytes
    value: bytes
    lease: int = 0

    def to_json(self) -> dict[str, Any]:
        """Encode the operation for the gateway."""
        return {"request_put": encode_put_request(self.key, self.value, self.lease, False)}


@dataclass(frozen=True)
class Delete:
    """A delete inside a transaction, returning the removed values when `prev_kv` is set."""

    key: bytes
    range_end: bytes | None = None
    prev_kv: bool = False

    def to_json(self) -> dict[str, Any]:
        """Encode the operation for the gateway."""
        return {
            "request_delete_range": encode_delete_request(self.key, self.range_end, self.prev_kv)
        }


Op = Get | Put | Delete


def encode_range_request(key: bytes, range_end: bytes | None) -> dict[str, Any]:
    """Encode a RangeRequest of `key`, or of [key, range_end) when range_end is set."""
    body = {"key": _b64(key)}
    if range_end is not None:
        body["range_end"] = _b64(range_end)
    return body


def encode_put_request(key: bytes, value: bytes, lease: int, prev_kv: bool) -> dict[str, Any]:
    """Encode a PutRequest, attached to `lease` unless it is 0."""
    body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        body["lease"] = str(lease)
    if prev_kv:
        body["prev_kv"] = True
    return body


def encode_delete_request(key: bytes, range_end: bytes | None, prev_kv: bool) -> dict[str, Any]:
    """Encode a DeleteRangeRequest of `key`, or of [key, range_end) when range_end is set."""
    body: dict[str, Any] = encode_range_request(key, range_end)
    if prev_kv:
        body["prev_kv"] = True
    return body


def decode_revision(reply: dict[str, Any]) -> int:
    """Return the store revision in the header of `reply`, or 0 when it has none."""
    return int(reply.get("header", {}).get("revision", 0))


def decode_key_value(item: dict[str, Any]) -> KeyValue:
    """Decode one key of a reply."""
    return KeyValue(
        key=_unb64(item.get("key")),
        value=_unb64(item.get("value")),
        create_revision=int(item.get("create_revision", 0)),
        mod_revision=int(item.get("mod_revision", 0)),
        version=int(item.get("version", 0)),
        lease=int(item.get("lease", 0)),
    )


def decode_range_response(reply: dict[str, Any]) -> RangeResult:
    """Decode a RangeResponse."""
    kvs = [decode_key_value(item) for item in reply.get("kvs", [])]
    count = int(reply.get("count", 0))
    return RangeResult(kvs, decode_revision(reply), count, bool(reply.get("more")))


def decode_put_response(reply: dict[str, Any]) -> PutResult:
    """Decode a PutResponse."""
    prev = reply.get("prev_kv")
    return PutResult(decode_revision(reply), decode_key_value(prev) if prev else None)


def decode_delete_response(reply: dict[str, Any]) -> DeleteResult:
    """Decode a DeleteRangeResponse."""
    prev_kvs = [decode_key_value(item) for item in reply.get("prev_kvs", [])]
    return DeleteResult(decode_revision(reply), int(reply.get("deleted", 0)), prev_kvs)


def decode_txn_response(reply: dict[str, Any]) -> TxnResult:
    """Decode a TxnResponse with the response of each operation the transaction ran."""
    responses = [_decode_op_response(item) for item in reply.get("responses", [])]
    return TxnResult(bool(reply.get("succeeded")), decode_revision(reply), responses)


def _decode_op_response(item: dict[str, Any]) -> OpResult:
    if "response_range" in item:
        return decode_range_response(item["response_range"])
    if "response_put" in item:
        return decode_put_response(item["response_put"])
    if "response_delete_range" in item:
        return decode_delete_response(item["response_delete_range"])
    raise ProtocolError(f"etcd sent an unknown transaction response: {item!r:.200}")


def decode_reply(response: httpx.Response, path: str, endpoint: str) -> dict[str, Any] | None:
    """Return the JSON body of a success, or None when another member may serve it.

    Raises the matching PxfsError for any other failure.
    """
    if response.status_code == 200:
        try:
            reply = response.json()
        except ValueError:
            raise ProtocolError(
                f"etcd at {endpoint} sent invalid JSON for {path}: {response.text!r:.200}"
            ) from None
        if not isinstance(reply, dict):
            raise ProtocolError(f"etcd at {endpoint} sent {reply!r:.200} for {path}")
        return reply
    error = error_from_response(response, path, endpoint)
    if _grpc_code(response) in _GRPC_TRY_ANOTHER_MEMBER:
        log.warning("etcd at %s: %s", endpoint, error.message)
        return None
    raise error


def _grpc_code(response: httpx.Response) -> int | None:
    try:
        body = response.json()
    except ValueError:
        return None
    code = body.get("code") if isinstance(body, dict) else None
    return code if isinstance(code, int) else None


def error_from_response(response: httpx.Response, path: str, endpoint: str) -> PxfsError:
    """Build the pxfs error for a failed reply, a ProtocolError when its body has no gRPC code."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("code"), int):
        return ProtocolError(
            f"etcd at {endpoint} returned HTTP {response.status_code} for {path}: "
            f"{response.text!r:.200}"
        )
    return error_from_body(body, path)


def error_from_body(body: dict[str, Any], path: str) -> PxfsError:
    """Build the pxfs error for the gRPC code in an error body.

    An unknown code is logged and becomes an InternalError.
    """
    # Unary calls report {"code": ..., "message": ...}. Streams report their error as
    # {"grpc_code": ..., "http_code": ..., "message": ...}.
    code = body.get("code", body.get("grpc_code"))
    message = body.get("message") or body.get("error") or "no message"
    cls = _GRPC_ERRORS.get(code, InternalError) if isinstance(code, int) else InternalError
    if cls is InternalError:
        log.error("etcd failed %s with gRPC code %r: %s", path, code, message)
    return cls(f"etcd failed {path}: {message}")


def describe_transport_error(exc: httpx.TransportError) -> str:
    """Return the message of `exc`, or its class name when it has none."""
    return str(exc) or type(exc).__name__


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""
