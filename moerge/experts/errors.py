"""Errors a user can cause when registering or addressing experts.

Each says what went wrong and what to do; the service maps `status` to the HTTP code.
"""

from __future__ import annotations


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
