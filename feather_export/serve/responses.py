"""OpenAI chat-completions response bodies: the full answer, stream chunks (server-sent events),
the model list and errors. Plain dicts and strings; no Ray, no HTTP here."""
from __future__ import annotations

import json
import time
import uuid


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(cid: str, model: str, created: int, text: str, finish_reason: str,
               prompt_tokens: int, completion_tokens: int) -> dict:
    return {"id": cid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk(cid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
          usage_counts: dict | None = None, choices: bool = True) -> dict:
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None,
                         "finish_reason": finish_reason}] if choices else []}
    if usage_counts is not None:
        body["usage"] = usage_counts
    return body


def sse(data: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line (``data: [DONE]`` at the end)."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def error(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def model_list(model: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": model, "object": "model", "created": created,
                                        "owned_by": "feather-export"}]}


def now() -> int:
    return int(time.time())
