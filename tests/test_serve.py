"""`feather-export serve` end to end: a real Ray local cluster, the real HTTP server on localhost,
called with the `openai` client; answers compared with Pipeline.generate in this process.

Ray and the application start once for the module (2 model replicas, ~20 s on 2 cores) and are
shut down at its end. The artifact is the random-weights `tiny` model: greedy decoding never
meets its end token, so a long answer gives the replica-kill test a wide window.
"""
from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("ray.serve", reason="the serve tests need ray[serve] (pip install '.[test]')")
openai = pytest.importorskip("openai", reason="the serve tests need openai (pip install '.[test]')")

from PIL import Image  # noqa: E402

from feather_export.export.artifact import ExportOptions, export  # noqa: E402
from feather_runtime import Pipeline  # noqa: E402

MAX_TEXT, MAX_NEW, MAX_PIXELS = 32, 512, 400 * 400
HEADER = "x-feather-replica"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET (no body) or a JSON POST, with the standard library."""
    request = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _png(seed: int, size=(64, 48)) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _messages(question: str, url: str) -> list:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(base_url, local Pipeline, image root) with the app running on 2 replicas."""
    from feather_export.serve.app import ServeConfig, start, stop

    root = tmp_path_factory.mktemp("serve")
    art = export("tiny", root / "art", ExportOptions(method="feather", max_text_tokens=MAX_TEXT,
                                                      max_new_tokens=MAX_NEW),
                 progress=lambda m: None)
    images = root / "images"
    images.mkdir()
    (images / "a.png").write_bytes(_png(1))
    (root / "secret.png").write_bytes(_png(2))
    (images / "link.png").symlink_to(root / "secret.png")
    port = _free_port()
    config = ServeConfig(artifact=art, replicas=2, port=port, image_root=images,
                         max_image_pixels=MAX_PIXELS, cpus_per_replica=0.5)
    try:
        start(config, ray_init_kwargs={"num_cpus": 2, "log_to_driver": False})
        pipe = Pipeline.load(art)
        yield f"http://127.0.0.1:{port}", pipe, images
        pipe.close()
    finally:
        stop(local=True)
    import ray

    assert not ray.is_initialized()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def _ask(client, question="What is in the image?", image=None, **kw):
    url = image if isinstance(image, str) else _data_url(image or _png(0))
    return client.chat.completions.create(model="tiny", messages=_messages(question, url), **kw)


def _local(pipe, question="What is in the image?", image=None, max_tokens=8, **kw):
    img = image if image is not None else _png(0)
    if isinstance(img, bytes):
        img = Image.open(io.BytesIO(img))
    return pipe.generate(img, question, max_new_tokens=max_tokens, **kw)


def _finish(result, max_tokens: int) -> str:
    """OpenAI's finish_reason for a Pipeline result (no stop strings)."""
    return "length" if len(result.token_ids) == max_tokens and result.token_ids[-1] != 2 else "stop"


CASES = [dict(max_tokens=8, temperature=0),
         dict(max_tokens=12, temperature=1.0, seed=3),
         dict(max_tokens=12, temperature=0.8, top_p=0.5, seed=11)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_answer_equals_pipeline_generate(server, client, case):
    _, pipe, _ = server
    image = _png(5)
    want = _local(pipe, "Where is the square?", image, **case)
    got = _ask(client, "Where is the square?", image, **case)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    assert got.model == "tiny" and got.object == "chat.completion"
    n_prompt = pipe.encode(Image.open(io.BytesIO(image)), "Where is the square?")[1].shape[1]
    assert got.usage.prompt_tokens == n_prompt
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.total_tokens == n_prompt + len(want.token_ids)
    assert got.choices[0].finish_reason == _finish(want, case["max_tokens"])


def test_stop_string(server, client):
    _, pipe, _ = server
    full = _local(pipe, max_tokens=16, temperature=0)
    stop = full.text[5:7]
    assert stop and full.text.find(stop) > 0
    want = _local(pipe, max_tokens=16, temperature=0, stop=(stop,))
    got = _ask(client, max_tokens=16, temperature=0, stop=[stop])
    assert got.choices[0].message.content == want.text == full.text[:full.text.find(stop)]
    assert got.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("case", CASES[:2], ids=["greedy", "sampled"])
def test_stream_concatenates_to_the_same_text(server, client, case):
    _, pipe, _ = server
    case = {**case, "max_tokens": 24}
    want = _local(pipe, **case)
    chunks = list(_ask(client, stream=True, stream_options={"include_usage": True}, **case))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [_finish(want, case["max_tokens"])]
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_image_path_under_root(server, client):
    _, pipe, images = server
    want = _local(pipe, image=(images / "a.png").read_bytes(), temperature=0)
    assert _ask(client, image="a.png", max_tokens=8, temperature=0).choices[0].message.content \
        == want.text
    got = _ask(client, image=f"file://{images / 'a.png'}", max_tokens=8, temperature=0)
    assert got.choices[0].message.content == want.text


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    status, body = _http(server[0] + "/health")
    assert status == 200 and body["status"] == "ok"


def test_16_concurrent_requests_over_2_replicas(server, client):
    _, pipe, _ = server
    jobs = [(f"Question number {i}?", _png(100 + i), i) for i in range(16)]
    want = [_local(pipe, q, img, max_tokens=16, temperature=1.0, seed=s).text for q, img, s in jobs]
    assert len(set(want)) > 8                     # the answers differ, so a mix-up would show

    def call(job):
        q, img, s = job
        raw = client.chat.completions.with_raw_response.create(
            model="tiny", messages=_messages(q, _data_url(img)), max_tokens=16, temperature=1.0,
            seed=s)
        return raw.headers[HEADER], raw.parse().choices[0].message.content

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(call, jobs))
    assert [text for _, text in got] == want
    assert len({replica for replica, _ in got}) == 2   # both replicas served


def _big_png() -> bytes:
    return _png(7, size=(401, 400))


BAD = {
    "malformed JSON": (400, "not valid JSON", None),
    "body not an object": (400, "JSON object", None),
    "no image": (400, "no image", dict(content=[{"type": "text", "text": "hi?"}])),
    "text-only content": (400, "no image", dict(content="hi?")),
    "two images": (400, "2 images", dict(urls=2)),
    "no question": (400, "no text", dict(question="")),
    "undecodable image": (400, "cannot be decoded", dict(url=_data_url(b"not an image at all"))),
    "invalid base64": (400, "invalid base64", dict(url="data:image/png;base64,@@@")),
    "remote URL": (400, "not fetched", dict(url="http://example.com/a.png")),
    "oversized image": (413, "at most 160000", dict(url="BIG")),
    "path outside root": (403, "outside", dict(url="../secret.png")),
    "absolute path outside root": (403, "outside", dict(url="/etc/hostname")),
    "symlink out of root": (403, "outside", dict(url="link.png")),
    "missing file": (400, "no image file", dict(url="nothing.png")),
    "max_tokens beyond limit": (400, f"at most {MAX_NEW}", dict(max_tokens=MAX_NEW + 1)),
    "max_tokens zero": (400, "positive integer", dict(max_tokens=0)),
    "unknown model": (404, "does not exist", dict(model="gpt-4o")),
    "prompt too long": (400, "too long", dict(question="a b c d e f g h " * 10)),
    "system message": (400, "one user message", dict(system=True)),
    "n=2": (400, "'n' must be 1", dict(n=2)),
    "temperature out of range": (400, "temperature", dict(temperature=3)),
    "bad stop": (400, "stop", dict(stop=[""])),
}


def _bad_body(spec: dict) -> dict:
    spec = dict(spec)
    url = spec.pop("url", _data_url(_png(0)))
    url = _data_url(_big_png()) if url == "BIG" else url
    question = spec.pop("question", "What is it?")
    parts = [{"type": "text", "text": question}] if question else []
    parts += [{"type": "image_url", "image_url": {"url": url}}] * spec.pop("urls", 1)
    messages = [{"role": "user", "content": spec.pop("content", parts)}]
    if spec.pop("system", False):
        messages.insert(0, {"role": "system", "content": "Be brief."})
    return {"model": spec.pop("model", "tiny"), "messages": messages, "max_tokens": 4, **spec}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_request_gets_4xx_and_server_keeps_serving(server, client, name):
    status, phrase, spec = BAD[name]
    body = {"malformed JSON": b'{"model": "tiny",', "body not an object": b"[1, 2]"}.get(name)
    got, answer = _http(server[0] + "/v1/chat/completions",
                        body or json.dumps(_bad_body(spec)).encode())
    assert got == status, answer
    error = answer["error"]
    assert phrase in error["message"]
    assert error["type"] == "invalid_request_error"
    # the openai client raises the matching error type
    if spec is not None:
        body = _bad_body(spec)
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(**body)
        assert info.value.status_code == status
    assert _ask(client, max_tokens=2, temperature=0).choices[0].message.content is not None


def test_load_generator(server):
    from feather_export.serve.loadgen import LoadConfig, run_load, summarize

    _, _, images = server
    samples = run_load(LoadConfig(url=server[0], model="tiny", image=images / "a.png",
                                  max_tokens=4, concurrency=3, duration=None, requests=7))
    summary = summarize(samples)
    assert summary["requests"] == summary["ok"] == 7 and summary["errors"] == 0
    assert all(s.completion_tokens == 4 and 0 < s.ttft <= s.latency for s in samples)
    assert summary["latency_s"]["p50"] <= summary["latency_s"]["p99"]
    assert summary["throughput_rps"] > 0
    bad = run_load(LoadConfig(url=server[0], model="nope", image=images / "a.png",
                              concurrency=2, duration=None, requests=2))
    assert summarize(bad)["errors"] == 2


def _replicas() -> dict:
    """replica id (the x-feather-replica header) -> actor handle, for the live model replicas."""
    import ray

    return {name.rsplit("#", 1)[1]: ray.get_actor(name, namespace="serve")
            for name in (a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                         if a["namespace"] == "serve")
            if name.startswith("SERVE_REPLICA::feather#FeatherModel#")}


def _wait_for_replicas(n: int, timeout: float = 90) -> dict:
    from ray import serve

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = serve.status().applications["feather"].deployments["FeatherModel"]
        if status.status == "HEALTHY" and status.replica_states.get("RUNNING") == n:
            live = _replicas()
            if len(live) == n:
                return live
        time.sleep(0.5)
    raise AssertionError(f"the model deployment did not get back to {n} replicas")


def test_killed_replica_costs_only_its_request(server, client):
    import ray

    _, pipe, _ = server
    before = _wait_for_replicas(2)
    long = dict(max_tokens=MAX_NEW, temperature=0)
    assert len(_local(pipe, **long).token_ids) == MAX_NEW       # a long answer: a wide window

    # 1. streaming: kill the replica after the first chunk -> the stream ends with an error
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=_messages("What is it?", _data_url(_png(0))), stream=True, **long)
    victim = raw.headers[HEADER]
    stream = raw.parse()
    chunks = iter(stream)
    next(chunks)
    ray.kill(before[victim])              # ends the replica's process at once
    with pytest.raises(openai.APIError, match="died"):
        for _ in chunks:
            pass

    # 2. non-streaming: kill the replica while it generates -> 503; a request on the other
    #    replica at the same time is unaffected
    live = _wait_for_replicas(2)
    assert victim not in live                                 # Ray Serve started a new one
    with ThreadPoolExecutor(2) as pool:
        doomed = pool.submit(_ask, client, **long)
        end = time.monotonic() + 30
        busy = None
        while busy is None and time.monotonic() < end:
            for handle in live.values():     # Serve's replica actor method (its router uses it)
                if ray.get(handle.get_num_ongoing_requests.remote()):
                    busy = handle
        assert busy is not None, "the long request never reached a replica"
        bystander = pool.submit(_ask, client, max_tokens=8, temperature=0)
        time.sleep(0.05)
        ray.kill(busy)
        with pytest.raises(openai.InternalServerError) as info:
            doomed.result()
        assert info.value.status_code == 503 and "died" in info.value.message
        assert bystander.result().choices[0].message.content == _local(pipe, temperature=0).text

    # 3. the deployment heals and every following request succeeds on both replicas
    _wait_for_replicas(2)
    want = _local(pipe, temperature=0).text
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: _ask(client, max_tokens=8, temperature=0), range(4)))
    assert [a.choices[0].message.content for a in answers] == [want] * 4
