"""The few errors jizhi knows, their wire codes and the worker exit codes.

Wire codes travel in error replies (``{status: "error", code, message}``) and
are the contract with clients: BAD_REQUEST and UNKNOWN_PIPELINE are the
client's fault and must not be retried as-is; OVERLOADED and
DEADLINE_EXCEEDED are retriable (OVERLOADED carries ``retry_after_ms``);
INTERNAL is jizhi's fault.

Worker exit codes tell the supervisor what to do instead of respawning blindly.
"""

BAD_REQUEST = "BAD_REQUEST"
UNKNOWN_PIPELINE = "UNKNOWN_PIPELINE"
OVERLOADED = "OVERLOADED"
DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
INTERNAL = "INTERNAL"

CODES = (BAD_REQUEST, UNKNOWN_PIPELINE, OVERLOADED, DEADLINE_EXCEEDED, INTERNAL)
RETRIABLE = frozenset((OVERLOADED, DEADLINE_EXCEEDED))

# Worker process exit codes (workers/run.py -> jizhi/supervisor/children.py).
EXIT_OK = 0
EXIT_BOOT_FAILURE = 3        # bad arguments, plan unreadable, import error
EXIT_MODEL_LOAD_FAILURE = 4  # bundle, profiles or ONNX session failed to load
EXIT_CUBE_OPEN_FAILURE = 5   # the LMDB cube could not be opened
EXIT_STALE_RUN = 6           # its supervisor or its shared-memory segments are gone (jizhi/lifeline.py)
EXIT_BIND_FAILURE = 7        # the broker cannot bind its frontend (address in use, no permission)


class JizhiError(Exception):
    """Base of jizhi's own errors."""


class ConfigError(JizhiError):
    """A config file or setting is invalid; the message names the setting."""


class PipelineError(JizhiError):
    """A pipeline does not compile; the message names the offending stage."""


class BundleError(JizhiError):
    """A model bundle is missing, incomplete or inconsistent."""


class RunDirError(JizhiError):
    """The run directory is not safe to use (another user could replace what jizhid writes there)."""


class ShmFull(JizhiError):
    """/dev/shm has no room for a segment; the message names the segment and the bytes it needs."""


class RequestError(JizhiError):
    """A request is rejected; ``code`` is one of CODES."""

    def __init__(self, code, message, retry_after_ms=None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_ms = retry_after_ms
