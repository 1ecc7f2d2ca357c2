"""The one exception family of voxlens."""

from __future__ import annotations


class VoxlensError(Exception):
    """Base of every voxlens error.

    ``code`` is the machine-readable name sent to clients in ``error`` events;
    ``recoverable`` says whether the session can go on after it.
    """

    code: str = "internal"
    recoverable: bool = True
    retry_after: float | None = None  # seconds, when trying again later may work (rate limits)

    def __init__(self, message: str, *, code: str | None = None, recoverable: bool | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        if recoverable is not None:
            self.recoverable = recoverable

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code


class ProtocolError(VoxlensError):
    """A client sent something the protocol does not allow; answered to that client only."""

    code = "bad_message"

    def __init__(self, message: str, *, code: str | None = None, recoverable: bool | None = None,
                 param: str | None = None):
        super().__init__(message, code=code, recoverable=recoverable)
        self.param = param  # the field at fault, where the protocol names one (Realtime)


class EngineError(VoxlensError):
    """A model engine failed; becomes an ``error`` event for the session that asked."""

    code = "engine_failed"


class ModelNotFound(VoxlensError):
    """A configured model could not be located or failed verification."""

    code = "model_not_found"
    recoverable = False
