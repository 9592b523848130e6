"""The served model's errors. A refused request raises a ``RequestError``: an ``MlflowException``
with error code ``INVALID_PARAMETER_VALUE``, which MLflow's scoring server answers as HTTP 400
with this message (any other exception becomes its generic "unexpected error"). Every class
survives pickling with its arguments (``__reduce__``)."""

from __future__ import annotations

from collections.abc import Sequence

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from recast.mixed import UnknownTaskError


class ServingError(ValueError):
    """Input or configuration the served model refuses (nothing is changed)."""


class BankMismatchError(ServingError):
    """A payload trained against other banks than the served ones."""

    def __init__(self, task: str, payload_sha: str, served_sha: str, where: str = ""):
        self.task, self.payload_sha, self.served_sha, self.where = task, payload_sha, served_sha, where
        super().__init__(f"payload of task {task!r}{' (' + where + ')' if where else ''} was trained against banks "
                         f"{str(payload_sha)[:12]}, the served banks are {served_sha[:12]}: "
                         "register a payload tuned on these banks (or serve its own banks)")

    def __reduce__(self):
        return type(self), (self.task, self.payload_sha, self.served_sha, self.where)


class RequestError(ServingError, MlflowException):
    """A request the served model refuses before any compute: HTTP 400 with this message."""

    def __init__(self, message: str):
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)

    def __reduce__(self):
        return type(self), (self.message,)


class UnknownServedTaskError(UnknownTaskError, RequestError):
    """A row's task is not one of the served tasks (``known``)."""

    def __init__(self, task: str, known: Sequence[str]):
        self.task, self.known = task, list(known)
        RequestError.__init__(self, f"unknown task {task!r}; this model serves the tasks {self.known}")

    def __reduce__(self):
        return type(self), (self.task, self.known)


class ImageShapeError(RequestError):
    """An image of another shape than the served input (or an encoded image of other channels)."""


class ImageDtypeError(RequestError):
    """An image whose values are not of the form its shape asks for (floats, or uint8 pixels)."""


class ImageValueError(RequestError):
    """An image with non-finite values, or pixels outside 0..255."""


class ImageDecodeError(RequestError):
    """An encoded image (base64 PNG or JPEG) that cannot be decoded."""


class EmptyBatchError(RequestError):
    """A request without rows."""


class RowLimitError(RequestError):
    """A request with more rows than the served model's ``max_rows``."""
