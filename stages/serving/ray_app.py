"""The served model on Ray Serve: the registered ``recast-serve.<arch>.<method>`` version, loaded
ONCE per replica (``mlflow.pyfunc.load_model``), answering the MLflow scoring server's JSON
(``/invocations``, ``/ping``, ``/health``, ``/version``) with concurrent requests of ANY tasks
gathered by ``@serve.batch`` into ONE mixed-task forward ``rc(x, tasks=...)``.

Start it with ``serve run infra/serve/recast-serve.yaml`` (a local Ray, or ``RAY_ADDRESS``); the
config file sets replicas or autoscaling, ``http_options.host`` (127.0.0.1 there) and this
app's arguments (``RayServeArgs``). Per request, before anything is computed: a body over
``max_request_bytes`` is refused with HTTP 413 before it is read whole or decoded (its
Content-Length, else counted while it streams in); the body is parsed by MLflow's own scoring
server functions, and the rows go through ``RecastServed.prepare`` (the same checks and image
decoding as ``predict``: a ``RequestError`` is HTTP 400 with MLflow's ``error_code`` and
message). Only valid requests join a batch, so one bad request fails alone. The forward's rows
(at most ``max_batch_rows``) are split back per request and answered by
``RecastServed.answer``: a client sees what the MLflow server returns. Headers
``x-recast-batch-rows`` / ``x-recast-batch-tasks`` say how many rows and distinct tasks the
forward that answered a request held.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from stages.tracking.store import tracking_uri

# isort: split
import mlflow  # noqa: E402 - after stages.tracking.store, which sets MLflow's environment defaults
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.pyfunc.scoring_server import infer_and_parse_data, predictions_to_json  # noqa: E402

log = logging.getLogger(__name__)
DEFAULT_MAX_REQUEST_BYTES = 32 * 2**20  # 256 rows of flattened floats are ~16 MB of JSON
BATCH_ROWS_HEADER, BATCH_TASKS_HEADER = "x-recast-batch-rows", "x-recast-batch-tasks"


class RayServeArgs(BaseModel):
    """The application's ``args`` in the Serve config file (an unknown key fails, named)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model_uri: str = "models:/recast-serve.vit.recast@current"
    tracking_uri: str | None = None  # default: MLFLOW_TRACKING_URI where the app is built, else the embedded store
    max_request_bytes: int = Field(DEFAULT_MAX_REQUEST_BYTES, ge=1)
    max_batch_rows: int = Field(512, ge=1)  # rows of one forward; at least the model's max_rows
    batch_wait_timeout_s: float = Field(0.005, ge=0)


def _error(status: int, error_code: str, message: str) -> JSONResponse:
    return JSONResponse({"error_code": error_code, "message": message}, status_code=status)


def _mlflow_error(err: MlflowException) -> Response:
    return Response(err.serialize_as_json(), status_code=err.get_http_status_code(), media_type="application/json")


@serve.deployment(max_ongoing_requests=64)
class RecastServe:
    """One replica: the served model loaded once; ``__call__`` speaks MLflow's scoring protocol."""

    def __init__(self, args: dict[str, Any]):
        self.args = RayServeArgs(**args)
        uri = self.args.tracking_uri or tracking_uri()
        os.environ["MLFLOW_TRACKING_URI"] = uri  # this replica's process: models:/ resolves through it
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
        self.model = mlflow.pyfunc.load_model(self.args.model_uri)
        self.served = self.model.unwrap_python_model()  # RecastServed (stages.serving.pyfunc)
        self.schema = self.model.metadata.get_input_schema()
        if self.args.max_batch_rows < self.served.max_rows:
            raise ValueError(f"max_batch_rows={self.args.max_batch_rows} is below the model's max_rows="
                             f"{self.served.max_rows}: one request would not fit a forward")
        self.forward_batch.set_max_batch_size(self.args.max_batch_rows)
        self.forward_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        log.info("replica serves %s: tasks %s", self.args.model_uri, self.served.tasks)

    @serve.batch(max_batch_size=512, batch_wait_timeout_s=0.005, batch_size_fn=lambda items: sum(len(t) for t, _ in items))
    async def forward_batch(self, items: list[tuple[list[str], torch.Tensor]]) -> list[tuple[torch.Tensor, int, int]]:
        """Requests of any tasks -> ONE mixed forward; per request (its logits, rows, distinct tasks of the forward)."""
        tasks = [t for request_tasks, _ in items for t in request_tasks]
        x = torch.cat([rows for _, rows in items])  # (sum of rows, C, S, S)
        logits = await asyncio.get_running_loop().run_in_executor(None, self.served.forward, x, tasks)
        sizes = [len(t) for t, _ in items]
        return [(part, len(tasks), len(set(tasks))) for part in torch.split(logits, sizes)]

    async def _body(self, request: Request) -> bytes | None:
        """The body, or None once it is longer than ``max_request_bytes`` (read no further)."""
        limit = self.args.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                return None
        return bytes(body)

    async def __call__(self, request: Request) -> Response:
        path = request.url.path.rstrip("/")
        prefix = request.scope.get("root_path", "").rstrip("/")  # the app's route_prefix, if Serve passes it
        path = path[len(prefix):] if prefix and path.startswith(prefix) else path
        if request.method == "GET" and path in ("/ping", "/health"):
            return Response("\n", media_type="application/json")
        if request.method == "GET" and path == "/version":
            return Response(mlflow.__version__)
        if path != "/invocations" or request.method != "POST":
            return _error(404, "ENDPOINT_NOT_FOUND", f"{request.method} {path or '/'}: this server answers "
                          "POST /invocations, GET /ping, /health, /version")
        mime = request.headers.get("content-type", "").split(";")[0].strip()
        if mime != "application/json":
            return Response(f"This server takes application/json (MLflow's JSON formats); got {mime!r}",
                            status_code=415, media_type="text/plain")
        body = await self._body(request)
        if body is None:
            return _error(413, "REQUEST_LIMIT_EXCEEDED", f"request body over {self.args.max_request_bytes} bytes "
                          "(max_request_bytes in the Serve config): split the request")
        loop = asyncio.get_running_loop()
        try:
            frame = await loop.run_in_executor(None, self._parse, body)
            try:
                tasks, x = await loop.run_in_executor(None, self.served.prepare, frame)
            except MlflowException as err:  # a RequestError: as the scoring server words it
                err.message = f"Failed to predict data '{frame}'. \nError: {err.message}"
                raise
        except MlflowException as err:
            return _mlflow_error(err)
        logits, batch_rows, batch_tasks = await self.forward_batch((tasks, x))
        out = await loop.run_in_executor(None, self.served.answer, logits, tasks)
        text = _to_json(out)
        return Response(text, media_type="application/json",
                        headers={BATCH_ROWS_HEADER: str(batch_rows), BATCH_TASKS_HEADER: str(batch_tasks)})

    def _parse(self, body: bytes):
        """The body as the DataFrame MLflow's scoring server would hand ``predict``."""
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise MlflowException.invalid_parameter_value(
                f"Ensure that input is a valid JSON formatted string. Error: '{err!r}'") from None
        if not isinstance(data, dict):
            raise MlflowException.invalid_parameter_value(
                f"The request body must be a JSON object (dataframe_split, dataframe_records, instances or inputs); "
                f"got {type(data).__name__}")
        data.pop("params", None)
        return infer_and_parse_data(data, self.schema)


def _to_json(frame) -> str:
    buf = io.StringIO()
    predictions_to_json(frame, buf)
    return buf.getvalue()


def app(args: dict[str, Any]) -> serve.Application:
    """Serve's application builder (``import_path: stages.serving.ray_app:app``): the config file's
    ``args`` are checked here, and the tracking URI is fixed where the app is built."""
    checked = RayServeArgs(**args)
    return RecastServe.bind(checked.model_copy(update={"tracking_uri": checked.tracking_uri or tracking_uri()})
                            .model_dump())
