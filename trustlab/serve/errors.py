"""Errors of the detection graph, shared by its preprocessing, detectors and HTTP layer."""


class RequestError(Exception):
    """A request the graph refuses: HTTP ``status``, a short machine-readable ``code``, a reason."""

    def __init__(self, status: int, code: str, reason: str):
        super().__init__(reason)
        self.status, self.code, self.reason = int(status), code, reason

    def as_dict(self) -> dict:
        return {"ok": False, "status": self.status, "code": self.code, "error": self.reason}


class DetectorError(RuntimeError):
    """A detector could not score a request (raised inside the replica, reported as failed)."""


def reason(e: BaseException, limit: int = 300) -> str:
    """One line for an exception, unwrapping Ray's task-error wrapper to the user's exception."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg}"[:limit] if msg else type(e).__name__
