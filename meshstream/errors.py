"""Exceptions shared between meshstream's parts."""


class MeshstreamError(Exception):
    """Base of meshstream's own errors."""


class UnknownContent(MeshstreamError):
    """No such content is known (to the tracker or to this agent)."""


class DownloadFailed(MeshstreamError):
    """A content could not be completed from any source."""


class SourceError(MeshstreamError):
    """An HTTP source answered with something other than the bytes asked for."""


class CheckDeclined(MeshstreamError):
    """A helper could not check a block after all (it is gone): check it some other way."""


class TrackerError(MeshstreamError):
    """The tracker answered with an error or could not be reached."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class QuotaExceeded(TrackerError):
    """The tracker refuses a node list: the user has used up their byte quota (HTTP 402)."""
