"""The pxfs error classes.

Every error that pxfs raises on purpose is a `PxfsError`. Each class carries the errno that the
FUSE boundary returns, the HTTP status that the REST API answers with, the exit code of pxctl and a
stable `code` string that the RPC layer sends over the wire. Three places translate them: the FUSE
operations adapter, the sidecar's error middleware and the RPC error registry (`from_code`).
"""

from __future__ import annotations

import errno as _errno


class PxfsError(Exception):
    """Base class of the errors that pxfs raises on purpose."""

    code = "internal"
    errno = _errno.EIO
    http_status = 500
    exit_code = 1

    def __init__(self, message: str = "") -> None:
        super().__init__(message or self.code)

    @property
    def message(self) -> str:
        """The human-readable message."""
        return str(self.args[0])


class InvalidArgument(PxfsError):
    code = "invalid_argument"
    errno = _errno.EINVAL
    http_status = 400
    exit_code = 2


class NotFound(PxfsError):
    code = "not_found"
    errno = _errno.ENOENT
    http_status = 404
    exit_code = 3


class AlreadyExists(PxfsError):
    code = "already_exists"
    errno = _errno.EEXIST
    http_status = 409
    exit_code = 4


class Busy(PxfsError):
    """The object is in use: attached, mounted, or locked by another process."""

    code = "busy"
    errno = _errno.EBUSY
    http_status = 409
    exit_code = 5


class PermissionDenied(PxfsError):
    code = "permission_denied"
    errno = _errno.EACCES
    http_status = 403
    exit_code = 6


class NotPermitted(PxfsError):
    code = "not_permitted"
    errno = _errno.EPERM
    http_status = 403
    exit_code = 6


class NoSpace(PxfsError):
    code = "no_space"
    errno = _errno.ENOSPC
    http_status = 507
    exit_code = 7


class NotEmpty(PxfsError):
    code = "not_empty"
    errno = _errno.ENOTEMPTY
    http_status = 409
    exit_code = 5


class NotADirectory(PxfsError):
    code = "not_a_directory"
    errno = _errno.ENOTDIR
    http_status = 400
    exit_code = 2


class IsADirectory(PxfsError):
    code = "is_a_directory"
    errno = _errno.EISDIR
    http_status = 400
    exit_code = 2


class NameTooLong(PxfsError):
    code = "name_too_long"
    errno = _errno.ENAMETOOLONG
    http_status = 400
    exit_code = 2


class TooManyLinks(PxfsError):
    code = "too_many_links"
    errno = _errno.EMLINK
    http_status = 400
    exit_code = 2


class NoAttribute(PxfsError):
    """An extended attribute that does not exist (ENODATA, spelled ENOATTR on BSD)."""

    code = "no_attribute"
    errno = _errno.ENODATA
    http_status = 404
    exit_code = 3


class NotSupported(PxfsError):
    code = "not_supported"
    errno = _errno.EOPNOTSUPP
    http_status = 501
    exit_code = 2


class RangeError(PxfsError):
    """A value outside what the call accepts, such as an xattr larger than the limit (ERANGE)."""

    code = "range"
    errno = _errno.ERANGE
    http_status = 400
    exit_code = 2


class FileTooLarge(PxfsError):
    code = "file_too_large"
    errno = _errno.EFBIG
    http_status = 400
    exit_code = 2


class StaleEpoch(PxfsError):
    """A write carried an epoch lower than the highest the replica has seen."""

    code = "stale_epoch"
    errno = _errno.ESTALE
    http_status = 409
    exit_code = 8


class StaleWrite(PxfsError):
    """A write, patch or trim was sent before a resync or reconnect of its replica started.

    A network cut can hold a frame in a socket until after the cut heals and the replica's resync
    has copied newer versions of its blocks, so the store rejects it.
    """

    code = "stale_write"
    errno = _errno.ESTALE
    http_status = 409
    exit_code = 8


class Unavailable(PxfsError):
    """A node, replica or service that the call needs cannot be reached."""

    code = "unavailable"
    errno = _errno.EIO
    http_status = 503
    exit_code = 9


class ChecksumMismatch(PxfsError):
    """A stored block failed its checksum and no good copy was left."""

    code = "checksum_mismatch"
    errno = _errno.EIO
    http_status = 500
    exit_code = 10


class Corrupted(PxfsError):
    """On-volume metadata failed a consistency check."""

    code = "corrupted"
    errno = _errno.EIO
    http_status = 500
    exit_code = 10


class AuthenticationFailed(PxfsError):
    code = "authentication_failed"
    errno = _errno.EACCES
    http_status = 401
    exit_code = 6


class ProtocolError(PxfsError):
    """A peer sent a frame that breaks the RPC protocol."""

    code = "protocol"
    errno = _errno.EPROTO
    http_status = 400
    exit_code = 9


class InternalError(PxfsError):
    """An unexpected failure, already logged with its traceback where it happened."""

    code = "internal"


def _all_classes() -> list[type[PxfsError]]:
    found: list[type[PxfsError]] = []
    pending: list[type[PxfsError]] = [PxfsError]
    while pending:
        cls = pending.pop()
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


_BY_CODE: dict[str, type[PxfsError]] = {}
for _cls in _all_classes():
    _BY_CODE.setdefault(_cls.code, _cls)
_BY_CODE["internal"] = InternalError


def from_code(code: str, message: str) -> PxfsError:
    """Rebuild the error that a remote side reported with `code` and `message`."""
    cls = _BY_CODE.get(code, InternalError)
    return cls(message)
