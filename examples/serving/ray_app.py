"""The attribution service on Ray Serve: replicas, each holding one model, batching concurrent requests.

Every replica of `AttributionService` loads one model (the embedded SmolLM2-135M-Instruct unless told
otherwise) and feeds what arrives within `batch_wait_timeout_s` (up to `max_batch_size` requests) through
`@serve.batch` into one `Attributor.generate_batch` (or `attribute_batch`, for requests that carry an answer).

    python -m examples.serving.ray_app --replicas 2                 # POST http://127.0.0.1:8000/attribute
    serve run examples.serving.ray_app:app_builder replicas=2 max_batch_size=8

HTTP: POST /attribute with {query, documents, history?, system_prompt?, answer?, max_new_tokens?} answers the
`Attribution.to_dict()` JSON; a malformed request is answered 422 (400 for a body that is not JSON) with the
message; GET /stats reports the batches each replica ran; GET /healthz. Python: `handle.attribute.remote(payload)`
on the `DeploymentHandle` that `serve.run` returns (see `handle_example`). docs/serving.md says more.

Batching rules (why each result equals `Attributor.generate` alone):
- requests are validated one by one *before* they join a batch: `Attributor.prepare` (schema, max_new_tokens,
  the answer, prompt rendering, the context window, each checked once), so a bad request is answered with its
  own error and never reaches a batch; the batch runs the `Prepared` requests as they are;
- inside a batch, requests run together only with equal settings: the attribute ones (answer given) in one
  `attribute_batch`, the generate ones in one `generate_batch` per `max_new_tokens` value. Generating to the
  batch's largest `max_new_tokens` and cutting would give the same greedy tokens but not the same result: the
  scores, citations and `finish_reason` of the cut answer would have to be recomputed, so we do not;
- if a model batch still raises, its requests are retried one by one, so only the bad one fails (the policy of
  `at2_rag.MicroBatcher`, whose worker does the same; `@serve.batch` here collects the batch instead of the
  batcher's own window, and the replica records each model batch's kind for `/stats`).
"""

# no `from __future__ import annotations`: FastAPI reads the route signatures (`request: Request`) at runtime
import argparse
import asyncio
import json
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from at2_rag import (
    AT2Error,
    Attribution,
    AttributionRequest,
    Attributor,
    ContextTooLongError,
    InvalidInputError,
    NoDocumentsError,
    Prepared,
    get_attributor,
)
from at2_rag.errors import PromptRenderError
from at2_rag.serving.batching import BatchItem, run_batch

logger = logging.getLogger(__name__)

#: errors that mean "this request is wrong" (answered 422 over HTTP); anything else is the server's fault (500)
CLIENT_ERRORS: tuple[type[Exception], ...] = (
    InvalidInputError, NoDocumentsError, ContextTooLongError, PromptRenderError,
)
REQUEST_KEYS = frozenset({"query", "documents", "history", "system_prompt", "answer", "max_new_tokens"})


class ServiceConfig(BaseModel):
    """How the service is deployed. Every field can be given to `build_app`, `app_builder` (`serve run ... k=v`)
    or the command line (`--max-batch-size 8`)."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="local HF causal LM folder or Hub id; None = the embedded model")
    estimator: str | None = Field(None, description="estimator folder / Hub id / score_estimator.pt; None = shipped")
    device: str | None = Field(None, description="e.g. 'cuda' (give gpus_per_replica too); None = the model's default")
    dtype: str | None = Field(None, description="e.g. 'bfloat16'; None = the model's default")
    replicas: int = Field(1, ge=1, description="replicas, each holding one model")
    cpus_per_replica: float = Field(1.0, gt=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    torch_threads: int | None = Field(None, ge=1, description="torch threads per replica; None = torch's default")
    max_batch_size: int = Field(8, ge=1, description="@serve.batch: the most requests in one batch")
    batch_wait_timeout_s: float = Field(0.05, ge=0, description="@serve.batch: how long a batch waits to fill")
    max_ongoing_requests: int | None = Field(None, ge=1, description="per replica; None = 2 x max_batch_size")
    default_max_new_tokens: int = Field(256, ge=1, description="for requests that do not say")
    max_new_tokens_limit: int = Field(1024, ge=1, description="requests asking more are answered 422")


@dataclass(frozen=True)
class Job:
    """One request: what it asks, the settings it may share a batch with, and (validated by `parse_job`) the
    `Prepared` request the model batch runs. A job without it is prepared, and so checked, inside its batch."""

    request: AttributionRequest
    max_new_tokens: int
    prepared: Prepared | None = None

    @property
    def key(self) -> tuple[Any, ...]:
        return ("attribute",) if self.request.answer is not None else ("generate", self.max_new_tokens)


@dataclass(frozen=True)
class ModelBatch:
    """One call to the model: `generate_batch` / `attribute_batch` of `size` requests (size 1 after a retry)."""

    kind: str
    size: int
    seconds: float
    retry: bool = False


def parse_job(payload: Any, attributor: Attributor, config: ServiceConfig) -> Job:
    """Validate one request completely before it joins a batch: an `InvalidInputError` (or another client
    error) naming what is wrong. `Attributor.prepare` checks everything once: max_new_tokens, the answer, the
    documents (rendering the prompt) and the context window."""
    if not isinstance(payload, Mapping):
        raise InvalidInputError(
            f"the request must be a JSON object with query and documents, got {type(payload).__name__}"
        )
    unknown = sorted(str(k) for k in payload if k not in REQUEST_KEYS)
    if unknown:
        raise InvalidInputError(f"unknown field(s) {', '.join(unknown)}; expected {', '.join(sorted(REQUEST_KEYS))}")
    fields = dict(payload)
    max_new_tokens = fields.pop("max_new_tokens", None)
    if max_new_tokens is None:
        max_new_tokens = config.default_max_new_tokens
    if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and (
        max_new_tokens > config.max_new_tokens_limit
    ):
        raise InvalidInputError(
            f"max_new_tokens={max_new_tokens} is above this service's limit of {config.max_new_tokens_limit}"
        )
    request = AttributionRequest.coerce(fields)
    prepared = attributor.prepare(request, max_new_tokens=max_new_tokens)  # a bad max_new_tokens raises here
    # an attributed answer generates nothing: every attribute request batches together
    return Job(request, max_new_tokens if prepared.generates else 0, prepared)


def run_jobs(attributor: Attributor, jobs: Sequence[Job]) -> tuple[list[Attribution | Exception], list[ModelBatch]]:
    """Run one serve batch: a model batch per settings group (in arrival order of the groups), with the core's
    batching policy (`at2_rag.serving.batching.run_batch`: a group that raises is retried one request at a time, so
    each request gets its own result or its own error). A job that was not prepared is prepared, and so checked,
    inside its batch."""
    outcomes: list[Attribution | Exception] = [RuntimeError("request was not run")] * len(jobs)
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(job.key, []).append(i)
    batches: list[ModelBatch] = []
    for key, members in groups.items():
        items = [BatchItem(jobs[i].prepared or jobs[i].request, max_new_tokens=jobs[i].max_new_tokens) for i in members]
        results, attempts = run_batch(attributor, items)
        batches += [ModelBatch(str(key[0]), a.size, a.seconds, retry=a.retry) for a in attempts if a.ok]
        for i, result in zip(members, results):
            outcomes[i] = result
    return outcomes, batches


def error_body(exc: BaseException) -> dict[str, Any]:
    return {"error": {"type": type(exc).__name__, "message": str(exc)}}


api = FastAPI(title="at2-rag attribution service")


@serve.deployment
@serve.ingress(api)
class AttributionService:
    """One replica: one model, one `@serve.batch` queue feeding `generate_batch` / `attribute_batch`."""

    def __init__(self, config: ServiceConfig | Mapping[str, Any] | None = None) -> None:
        self.config = config if isinstance(config, ServiceConfig) else ServiceConfig(**dict(config or {}))
        if self.config.torch_threads:
            torch.set_num_threads(self.config.torch_threads)
        started = time.perf_counter()
        self.attributor = get_attributor(
            self.config.model, estimator=self.config.estimator, device=self.config.device, dtype=self.config.dtype
        )
        logger.info("replica loaded %s in %.1f s", self.attributor.model_id or self.config.model or "the model",
                    time.perf_counter() - started)
        batcher: Any = self._run_batch  # @serve.batch's setters (not in its type hints)
        batcher.set_max_batch_size(self.config.max_batch_size)
        batcher.set_batch_wait_timeout_s(self.config.batch_wait_timeout_s)
        self._stats_lock = threading.Lock()
        self._serve_batches: list[int] = []
        self._model_batches: list[ModelBatch] = []

    # ---- the Python API (DeploymentHandle) ----------------------------------------------------------------
    async def attribute(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """One request (a dict with the HTTP body's keys) -> `Attribution.to_dict()`. A bad request raises its
        own `InvalidInputError` (or other client error) without joining a batch."""
        job = await asyncio.to_thread(parse_job, payload, self.attributor, self.config)
        outcome = await self._run_batch(job)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome.to_dict()

    async def stats(self) -> dict[str, Any]:
        """The batches this replica ran: what `@serve.batch` handed over, and each model call."""
        with self._stats_lock:
            return {
                "model_id": self.attributor.model_id,
                "max_batch_size": self.config.max_batch_size,
                "batch_wait_timeout_s": self.config.batch_wait_timeout_s,
                "serve_batch_sizes": list(self._serve_batches),
                "model_batches": [b.__dict__ for b in self._model_batches],
            }

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # replaced in __init__ by the config's values
    async def _run_batch(self, jobs: list[Job]) -> list[Attribution | Exception]:
        # the model runs in a worker thread: the replica's event loop keeps validating and queueing requests
        outcomes, batches = await asyncio.to_thread(run_jobs, self.attributor, jobs)
        with self._stats_lock:
            self._serve_batches.append(len(jobs))
            self._model_batches.extend(batches)
        for b in batches:
            logger.info("ran a %s batch of %d in %.2f s%s", b.kind, b.size, b.seconds, " (retry)" if b.retry else "")
        return outcomes

    # ---- HTTP -------------------------------------------------------------------------------------------------
    @api.post("/attribute")
    async def attribute_http(self, request: Request) -> JSONResponse:
        try:
            payload = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as exc:
            return JSONResponse(error_body(InvalidInputError(f"the body is not JSON: {exc}")), status_code=400)
        try:
            return JSONResponse(await self.attribute(payload))
        except CLIENT_ERRORS as exc:
            return JSONResponse(error_body(exc), status_code=422)
        except AT2Error as exc:
            logger.exception("request failed")
            return JSONResponse(error_body(exc), status_code=500)
        except Exception:
            logger.exception("request failed")
            return JSONResponse({"error": {"type": "InternalError", "message": "internal error"}}, status_code=500)

    @api.get("/stats")
    async def stats_http(self) -> dict[str, Any]:
        return await self.stats()

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}


def build_app(config: ServiceConfig | Mapping[str, Any] | None = None) -> serve.Application:
    """The bound application: `config.replicas` replicas with the given resources, ready for `serve.run`."""
    cfg = config if isinstance(config, ServiceConfig) else ServiceConfig(**dict(config or {}))
    actor_options: dict[str, Any] = {"num_cpus": cfg.cpus_per_replica}
    if cfg.gpus_per_replica:
        actor_options["num_gpus"] = cfg.gpus_per_replica
    deployment = cast(serve.Deployment, AttributionService).options(
        num_replicas=cfg.replicas,
        ray_actor_options=actor_options,
        max_ongoing_requests=cfg.max_ongoing_requests or 2 * cfg.max_batch_size,
    )
    return deployment.bind(cfg.model_dump())


def app_builder(args: dict[str, str]) -> serve.Application:
    """For `serve run examples.serving.ray_app:app_builder replicas=2 max_batch_size=8 model=/path`."""
    return build_app(ServiceConfig.model_validate(args))  # pydantic turns "2" into 2


def handle_example(handle: DeploymentHandle) -> list[dict[str, Any]]:
    """Python callers: several `.remote()` calls in flight at once share a batch; `.result()` waits for each."""
    documents = ["The Eiffel Tower opened in 1889 in Paris.", "Berlin is the capital of Germany."]
    responses = [
        handle.attribute.remote({"query": "When did the Eiffel Tower open?", "documents": documents}),
        handle.attribute.remote({"query": "What is the capital of Germany?", "documents": documents}),
        handle.attribute.remote({"query": "Capital?", "documents": documents, "answer": "Berlin."}),
    ]
    return [r.result() for r in responses]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve at2-rag attribution on Ray Serve (a local Ray unless "
                                     "RAY_ADDRESS names a cluster you started).")
    for name, field in ServiceConfig.model_fields.items():  # strings: ServiceConfig validates and converts them
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=field.description)
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    args = vars(parser.parse_args(argv))
    host, port = args.pop("host"), args.pop("port")
    config = ServiceConfig.model_validate({k: v for k, v in args.items() if v is not None})
    logging.basicConfig(level=logging.INFO)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(config), name="at2-rag", route_prefix="/")
    logger.info("serving %d replica(s) on http://%s:%d/attribute (Ctrl-C stops)", config.replicas, host, port)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


if __name__ == "__main__":
    main()
