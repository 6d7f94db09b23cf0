"""The Ray Serve deployments: ``FeatherModel`` (one Pipeline per replica, one request at a time)
behind ``OpenAIIngress`` (the HTTP routes, request checks, SSE formatting, error mapping).

The ingress checks every request (protocol.py) before it reaches a model replica, so bad input
costs no model time and never touches a replica. A model replica that dies is restarted by Ray
Serve; the ingress turns the failure of the request it was serving into a 5xx (or, once a stream
has started, into an error event that ends the stream without ``[DONE]``).
"""
# no `from __future__ import annotations`: FastAPI must see the real `Request` annotation

import asyncio
from pathlib import Path
from typing import Iterator, Optional

from fastapi import FastAPI, Request
from ray import serve
from ray.exceptions import RayError, RayTaskError
from starlette.responses import JSONResponse, StreamingResponse

from feather_export.errors import FeatherError
from feather_export.serve import responses
from feather_export.serve.protocol import (ChatRequest, Limits, RequestError, count_prompt_tokens,
                                           parse_chat_request, parse_json)

REPLICA_HEADER = "x-feather-replica"     # the Serve replica id of the model replica that answered
MAX_BODY_BYTES = 64 << 20


def _failure_body(exc: BaseException) -> tuple[int, dict]:
    if isinstance(exc, RayTaskError):
        return 500, responses.error(f"the model replica failed on this request: "
                                    f"{type(exc.cause).__name__}: {exc.cause}"[:500], "server_error")
    if isinstance(exc, RayError):
        return 503, responses.error(f"the model replica serving this request died "
                                    f"({type(exc).__name__}); Ray Serve restarts it, retry the "
                                    "request", "server_error", code="replica_died")
    return 500, responses.error(f"internal error: {type(exc).__name__}: {exc}"[:500],
                                "server_error")


def _failure(exc: BaseException) -> JSONResponse:
    status, body = _failure_body(exc)
    return JSONResponse(body, status_code=status)


def load_pipeline(artifact: str, backend: Optional[str], threads: Optional[int]):
    """A Pipeline on ``backend`` with ONNX Runtime limited to ``threads`` intra-op threads (the
    replica's CPUs), so replicas sharing a machine do not oversubscribe it."""
    from feather_runtime import Pipeline
    from feather_runtime.backends import get_backend
    from feather_runtime.manifest import load_manifest

    manifest = load_manifest(artifact, verify=True)
    chosen = get_backend(backend)
    if threads and hasattr(chosen, "threads"):
        chosen.threads = threads
    runners = {seg.name: chosen.load(manifest.root, seg) for seg in manifest.segments}
    return Pipeline(manifest, chosen, runners, owns_backend=True)


@serve.deployment(max_ongoing_requests=1, health_check_period_s=2, health_check_timeout_s=30)
class FeatherModel:
    """One replica = one Pipeline; Serve sends it one request at a time."""

    def __init__(self, artifact: str, backend: str | None, threads: int | None):
        self.pipe = load_pipeline(artifact, backend, threads)
        self.replica_id = serve.get_replica_context().replica_id.unique_id

    def generate(self, request: ChatRequest) -> Iterator[dict]:
        """Yields {"replica"}, then {"text"} pieces, then {"finish_reason", "completion_tokens"};
        or {"error"} if the runtime refuses the request (the replica keeps serving)."""
        yield {"replica": self.replica_id}
        result = None
        try:
            for item in self.pipe.generate_stream(request.image, request.question,
                                                  **request.generate_kwargs()):
                if isinstance(item, str):
                    yield {"text": item}
                else:
                    result = item
        except FeatherError as exc:       # refused by the runtime: the replica keeps serving
            yield {"error": str(exc)}
            return
        yield {"finish_reason": self._finish_reason(request, result.token_ids),
               "completion_tokens": len(result.token_ids)}

    def _finish_reason(self, request: ChatRequest, tokens: list[int]) -> str:
        if len(tokens) < request.max_tokens or tokens[-1] in self.pipe.eos_token_ids:
            return "stop"
        text = self.pipe.prompt_builder.decode(tokens)
        return "stop" if any(s in text for s in request.stop) else "length"


app = FastAPI(title="feather-export", docs_url=None, redoc_url=None)


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class OpenAIIngress:
    def __init__(self, model, artifact: str, model_name: str, max_image_pixels: int,
                 image_root: str | None):
        from feather_runtime.manifest import load_manifest
        from feather_runtime.prompt import PromptBuilder

        manifest = load_manifest(artifact, verify=False)
        self.model = model
        self.created = responses.now()
        self.num_image_tokens = manifest["model"]["num_image_tokens"]
        self.builder = PromptBuilder.for_artifact(manifest)     # the artifact's own template
        self.limits = Limits(model=model_name, max_tokens=manifest["max_new_tokens"],
                             max_text_tokens=manifest["max_text_tokens"],
                             max_image_pixels=max_image_pixels,
                             image_root=None if image_root is None else Path(image_root))

    @app.get("/health")
    async def health(self) -> dict:
        return {"status": "ok", "model": self.limits.model}

    @app.get("/v1/models")
    async def models(self) -> dict:
        return responses.model_list(self.limits.model, self.created)

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        try:
            body = await request.body()
            if len(body) > MAX_BODY_BYTES:
                raise RequestError(f"the request body is {len(body)} bytes; at most "
                                   f"{MAX_BODY_BYTES} are accepted", status=413)
            chat, prompt_tokens = await asyncio.to_thread(self._parse, body)
        except RequestError as exc:
            return JSONResponse(exc.body(), status_code=exc.status)
        stream = self.model.options(stream=True).generate.remote(chat)
        try:
            meta = await stream.__anext__()
            first = await stream.__anext__()       # the first token (or a refusal) is here
        except Exception as exc:                 # noqa: BLE001 - mapped to a 5xx below
            return _failure(exc)
        if "error" in first:
            return JSONResponse(responses.error(first["error"], "invalid_request_error"),
                                status_code=400)
        headers = {REPLICA_HEADER: meta["replica"]}
        cid, created = responses.completion_id(), responses.now()
        if chat.stream:
            events = self._events(chat, stream, first, cid, created, prompt_tokens)
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        pieces, last = [], first
        try:
            while "text" in last:
                pieces.append(last["text"])
                last = await stream.__anext__()
        except Exception as exc:                 # noqa: BLE001
            return _failure(exc)
        body = responses.completion(cid, chat.model, created, "".join(pieces),
                                    last["finish_reason"], prompt_tokens,
                                    last["completion_tokens"])
        return JSONResponse(body, headers=headers)

    def _parse(self, body: bytes) -> tuple[ChatRequest, int]:
        chat = parse_chat_request(parse_json(body), self.limits)
        tokens = count_prompt_tokens(chat.question, self.builder, self.num_image_tokens,
                                     self.limits.max_text_tokens)
        return chat, tokens

    async def _events(self, chat: ChatRequest, stream, item: dict, cid: str, created: int,
                      prompt_tokens: int):
        model = chat.model
        yield responses.sse(responses.chunk(cid, model, created, {"role": "assistant",
                                                                  "content": ""}))
        try:
            while "text" in item:
                yield responses.sse(responses.chunk(cid, model, created, {"content": item["text"]}))
                item = await stream.__anext__()
        except Exception as exc:                 # noqa: BLE001 - ends the stream with an error
            status, body = _failure_body(exc)
            yield responses.sse(body)
            return
        yield responses.sse(responses.chunk(cid, model, created, {}, item["finish_reason"]))
        if chat.include_usage:
            counts = responses.usage(prompt_tokens, item["completion_tokens"])
            yield responses.sse(responses.chunk(cid, model, created, {}, usage_counts=counts,
                                                choices=False))
        yield responses.sse("[DONE]")
