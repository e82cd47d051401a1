"""Errors a user can cause when registering or addressing experts.

Each says what went wrong and what to do; the service maps `status` to the HTTP code.
"""

from __future__ import annotations

import contextlib
import errno


class ExpertError(Exception):
    status = 400

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class AdapterConfigError(ExpertError):
    """adapter_config.json is missing or unparsable."""


class WrongBaseModelError(ExpertError):
    """The adapter was trained on another base model."""


class TargetModuleError(ExpertError):
    """The adapter targets modules the base model does not have."""


class ShapeMismatchError(ExpertError):
    """A LoRA tensor's shape does not fit the base module it adapts."""


class RankError(ExpertError):
    """The LoRA rank is out of the accepted range."""


class NonFiniteWeightsError(ExpertError):
    """A tensor holds NaN or Inf."""


class UnsafeFormatError(ExpertError):
    """Weights in a pickle-based format; never unpickled."""


class InvalidNameError(ExpertError):
    """A name with path separators, '..', control characters or otherwise not allowed."""


class NameTakenError(ExpertError):
    status = 409


class UploadTooLargeError(ExpertError):
    status = 413


class InvalidModelExpertError(ExpertError):
    """A whole-model expert that is neither a local model folder nor a LiteLLM model with api_base."""


class PathOutsideStoreError(ExpertError):
    """A path that escapes the folder it must stay in."""


class UnknownExpertError(ExpertError):
    status = 404


class AdapterWeightsError(ExpertError):
    """The adapter weights file is missing, unreadable, or holds tensors moerge cannot use."""


class UnsafeArchiveError(ExpertError):
    """An uploaded archive that could harm the server: a tar bomb, a link, a device, a huge header."""


class UnsupportedMediaTypeError(ExpertError):
    """A request or an uploaded part whose type is not what moerge accepts, or not what it claims."""
    status = 415


class RegistryBusyError(ExpertError):
    """Another process held the registry database's lock past the busy timeout; nothing was changed."""
    status = 503
    retry_after = 2


class StorageFullError(ExpertError):
    """The disk under the pool folder (or a file-size limit) left no room; nothing was registered."""
    status = 507


STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def storage_full(exc: OSError, where) -> StorageFullError | None:
    """The typed error for a write that failed for want of room (ENOSPC, EFBIG, EDQUOT), else None."""
    room = ("free some space there (or set MOERGE_POOL_DIR to a larger disk) and send the registration again")
    what = {errno.ENOSPC: f"no space left on the device holding the expert pool ({where})",
            errno.EDQUOT: f"the disk quota for the expert pool ({where}) is used up",
            errno.EFBIG: f"a file in the expert pool ({where}) would pass this process's file-size limit"}
    if exc.errno not in what:
        return None
    remedy = "raise the server's file-size limit (ulimit -f) and send the registration again" \
        if exc.errno == errno.EFBIG else room
    return StorageFullError(f"{what[exc.errno]}; nothing was registered: {remedy}")


@contextlib.contextmanager
def full_disk_is_507(where):
    """Inside: an OSError for want of room becomes StorageFullError; any other error passes unchanged."""
    try:
        yield
    except OSError as e:
        full = storage_full(e, where)
        if full is None:
            raise
        raise full from e
