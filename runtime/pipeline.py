"""``Pipeline``: prefill (vision -> embed+merge -> decoder spans with selection) and decode.

Positions follow docs/design.md §3: kept tokens keep their original positions and decoding continues after
the last one (FasterVLM: contiguous positions of the shortened sequence).

Everything between segments stays in the backend's memory (device.py): a workspace allocated once
(pixels, prompt ids, positions, the merged prompt, the decode token and position) and one static
KV cache per span; segments read each other's outputs in place. The host uploads inputs and
downloads the logits (every step) and the kept indices and last position (after prefill).

Calls are serialized by a lock: a Pipeline can be shared between threads, one request runs at a
time.
"""
from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .backends import get_backend
from .errors import FeatherError
from .kv_cache import SpanCache
from .manifest import Manifest, load_manifest
from .sampling import Sampler, SamplingConfig

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}
DEFAULT_MAX_NEW_TOKENS = 64          # capped at the artifact's --max-new-tokens
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")       # SentencePiece byte-fallback pieces


@dataclass
class Result:
    token_ids: list[int]
    kept: list[list[int]]                  # original image indices kept, per stage
    timings: dict[str, float]              # seconds, plus decode_tokens_per_s
    text: str = ""
    first_logits: np.ndarray | None = field(default=None, repr=False)


@dataclass
class _Step:
    """One prefill step: a decoder span, optionally followed by its select segment."""
    span: str
    cache: SpanCache
    select: str | None
    passed: tuple[str, ...] = ()      # span outputs the select segment takes (scores, hidden)


class Pipeline:
    def __init__(self, manifest: Manifest, backend, runners: dict, owns_backend: bool = False):
        """``owns_backend``: ``close`` also closes the backend (``Pipeline.load`` creates one per
        Pipeline; a backend passed in here may be shared and is left open)."""
        self.manifest = manifest
        self.backend = backend
        self.runners = runners
        self.owns_backend = owns_backend
        self.closed = False
        self._lock = threading.Lock()
        self._owner: int | None = None
        model = manifest["model"]
        self.num_image_tokens = model["num_image_tokens"]
        self.image_token_id = model["image_token_id"]
        self.eos_token_ids = set(model["eos_token_ids"])
        self.method = manifest["prune"]["method"]
        self.stages = manifest["prune"]["stages"]
        check_runnable(manifest)
        self.dtype = NUMPY_DTYPES[manifest["dtype"]]
        # the KV caches' dtypes: the artifact's, unless the backend keeps one in its own (OpenVINO
        # at bf16 keeps the values in bfloat16, the precision its kernels read them in)
        self.key_dtype = self.dtype
        self.value_dtype = getattr(backend, "value_cache_dtype", None) or self.dtype
        self.max_new_tokens_limit = int(manifest["max_new_tokens"])
        self.memory = backend.memory
        self.workspace = self._allocate_workspace()
        self.steps = self._plan_steps()
        self._preprocessor = self._prompt = None

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def load(cls, path, backend: str | None = None, verify: bool = True) -> "Pipeline":
        """Open an artifact directory (checked against its manifest) with a backend."""
        manifest = load_manifest(path, verify=verify)
        check_runnable(manifest)                 # before any session or engine is created
        chosen = get_backend(backend)
        try:
            runners = {seg.name: chosen.load(manifest.root, seg) for seg in manifest.segments}
            return cls(manifest, chosen, runners, owns_backend=True)
        except BaseException:
            _close(chosen)
            raise

    def close(self) -> None:
        """Free the workspace and KV caches (device memory on CUDA backends) and, for a Pipeline
        from ``load``, the backend (sessions, engines, stream). Waits for a running request.
        Also ``with Pipeline.load(...) as pipe:``."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            for tensor in self.workspace.values():
                self.memory.release(tensor)
            for step in self.steps:
                step.cache.release()
            self.workspace, self.steps, self.runners = {}, [], {}
            if self.owns_backend:
                _close(self.backend)

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _plan_steps(self) -> list[_Step]:
        m = self.manifest["model"]
        limit = self.manifest["max_text_tokens"] + self.manifest["max_new_tokens"]
        num_image = self.num_image_tokens if self.method != "fastervlm" else self.stages[0]["keep"]
        steps = []
        segments = self.manifest.segments
        for i, seg in enumerate(segments):
            if seg.kind != "decoder":
                continue
            nxt = segments[i + 1] if i + 1 < len(segments) else None
            select = nxt.name if nxt is not None and nxt.kind == "select" else None
            cache = SpanCache(self.memory, range(*seg.layers), limit + num_image,
                              m["num_key_value_heads"], m["head_dim"], self.key_dtype,
                              self.value_dtype)
            passed = tuple(i["name"] for i in nxt.inputs
                           if i["name"] not in ("position_ids", "image_start")) if select else ()
            steps.append(_Step(seg.name, cache, select, passed))
            if select is not None:
                num_image = self.stages[nxt.stage]["keep"]
        return steps

    def _allocate_workspace(self) -> dict:
        """Every host-to-device input gets a buffer of its largest shape, allocated once: nothing
        is allocated per call or step, and decode inputs keep fixed addresses (CUDA graphs)."""
        m = self.manifest["model"]
        longest = self.manifest["max_text_tokens"] + self.num_image_tokens
        from .preprocess import pixel_shape

        shapes = {"pixel_values": (pixel_shape(m), np.float32),
                  "input_ids": ((1, longest), np.int64),
                  "position_ids": ((1, longest), np.int64),
                  "image_start": ((), np.int64),
                  "hidden": ((1, longest, m["hidden_size"]), self.dtype),
                  "token": ((1, 1), np.int64),
                  "position": ((1, 1), np.int64)}
        return {name: self.memory.empty(shape, dtype) for name, (shape, dtype) in shapes.items()}

    # ---- user inputs --------------------------------------------------------------------
    @property
    def preprocessor(self):
        from .preprocess import preprocessor_for

        if self._preprocessor is None:
            self._preprocessor = preprocessor_for(self.manifest.root,
                                                  self.manifest["model"].get("anyres"))
        return self._preprocessor

    @property
    def prompt_builder(self):
        from .prompt import PromptBuilder

        if self._prompt is None:
            self._prompt = PromptBuilder.for_artifact(self.manifest)
        return self._prompt

    def encode(self, image, prompt: str):
        """Preprocessed (pixel_values, input_ids) for an image path/PIL image and a question."""
        from .preprocess import load_image

        if image is None:
            raise FeatherError("this model needs an image: pass image=PATH (or --image)")
        pixels = self.preprocessor(load_image(image))
        ids = self.prompt_builder.build(prompt, self.num_image_tokens)
        return pixels, ids

    # ---- generation ---------------------------------------------------------------------
    def default_max_new_tokens(self) -> int:
        """64, or the artifact's limit (``--max-new-tokens`` at build) when that is smaller."""
        return min(DEFAULT_MAX_NEW_TOKENS, self.max_new_tokens_limit)

    def generate(self, image=None, prompt: str = "", max_new_tokens: int | None = None,
                 **kwargs) -> Result:
        """``max_new_tokens`` None: ``default_max_new_tokens()``. ``ignore_eos=True`` generates
        exactly ``max_new_tokens`` tokens (benchmarks)."""
        pixels, ids = self.encode(image, prompt)
        return self.generate_ids(pixels, ids, max_new_tokens, decode_text=True, **kwargs)

    def stream(self, image=None, prompt: str = "", max_new_tokens: int | None = None,
               **kwargs) -> Iterator[str]:
        """Yield the answer's text as it is generated."""
        for piece in self.generate_stream(image, prompt, max_new_tokens, **kwargs):
            if isinstance(piece, str):
                yield piece

    def generate_stream(self, image=None, prompt: str = "", max_new_tokens: int | None = None,
                        **kwargs) -> Iterator[str | Result]:
        """Yield the answer's text pieces as they are generated (as ``stream``), then the
        ``Result`` (token ids, kept indices, timings; its text is the pieces joined)."""
        pixels, ids = self.encode(image, prompt)
        yield from self._generate(pixels, ids, max_new_tokens, stream=True, **kwargs)

    def generate_ids(self, pixel_values, input_ids, max_new_tokens: int | None = None, *,
                     decode_text: bool = False, **kwargs) -> Result:
        """Generate from preprocessed inputs (image token already expanded to N in input_ids)."""
        result = None
        for item in self._generate(pixel_values, input_ids, max_new_tokens,
                                   decode_text=decode_text, **kwargs):
            result = item
        return result

    def _generate(self, pixel_values, input_ids, max_new_tokens, *, temperature=0.0, top_k=0,
                  top_p=1.0, seed=None, stop=(), ignore_eos=False, stream=False, decode_text=False):
        sampler = Sampler(SamplingConfig(temperature, top_k, top_p, seed))
        if max_new_tokens is None:
            max_new_tokens = self.default_max_new_tokens()
        eos = frozenset() if ignore_eos else self.eos_token_ids
        pixel_values, input_ids, start = self._check_inputs(pixel_values, input_ids, max_new_tokens)
        self._acquire()
        try:
            if self.closed:
                raise FeatherError("this Pipeline is closed; load the artifact again")
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            logits, kept, next_pos = self._prefill(pixel_values, input_ids, start, timings)
            timings["ttft"] = time.perf_counter() - t0
            tokens, text, emitted = [], "", ""
            first_logits = logits
            t1 = time.perf_counter()
            stop = (stop,) if isinstance(stop, str) else tuple(stop)
            for step in range(max_new_tokens):
                token = sampler(logits)
                tokens.append(token)
                last = token in eos or step + 1 == max_new_tokens
                if stream or decode_text or stop:
                    new_text = self.prompt_builder.decode(tokens)
                    cut = _stop_index(new_text, stop)
                    if cut is not None:
                        new_text = new_text[:cut]
                    text = new_text
                    if stream:
                        # emit only text that later tokens cannot change, so the pieces add up to
                        # generate().text; the rest comes with the last token
                        ready = (text if cut is not None or last
                                 else self._stable_text(tokens, text, stop))
                        if len(ready) > len(emitted) and ready.startswith(emitted):
                            yield ready[len(emitted):]
                            emitted = ready
                    if cut is not None:
                        break
                if last:
                    break
                logits = self._decode_step(token, next_pos)
                next_pos += 1
            decode_time = time.perf_counter() - t1
            timings["decode"] = decode_time
            steps = max(len(tokens) - 1, 0)
            timings["decode_tokens_per_s"] = steps / decode_time if steps and decode_time else 0.0
            yield Result(tokens, kept, timings, text, first_logits)
        finally:
            self._owner = None
            self._lock.release()

    def _acquire(self) -> None:
        """One request at a time: other threads wait; the owning thread is refused (no deadlock)."""
        if self._owner == threading.get_ident():
            raise FeatherError("this thread still has an unfinished stream() on this Pipeline; "
                               "consume or close() it before starting another request")
        self._lock.acquire()
        self._owner = threading.get_ident()

    def _stable_text(self, tokens: list[int], text: str, stop: tuple[str, ...]) -> str:
        """The prefix of ``text`` that more tokens cannot change. Held back: the text of a trailing
        run of byte-fallback tokens (decoded together: a lone byte can turn into replacement
        characters once the next byte arrives), trailing U+FFFD and the start of a stop string."""
        tokenizer = self.prompt_builder.tokenizer
        k = len(tokens)
        while k and _BYTE_TOKEN.fullmatch(tokenizer.id_to_token(tokens[k - 1]) or ""):
            k -= 1
        if k < len(tokens):
            text = os.path.commonprefix([text, self.prompt_builder.decode(tokens[:k])])
        text = text.rstrip("\ufffd")
        hold = max((n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return text[:len(text) - hold]

    def _check_inputs(self, pixel_values, input_ids, max_new_tokens):
        pixels = np.ascontiguousarray(pixel_values, dtype=np.float32)
        from .preprocess import pixel_shape

        shape = pixel_shape(self.manifest["model"])
        if pixels.shape != shape:
            raise FeatherError(f"pixel_values must have shape {shape}; got {pixels.shape}")
        ids = np.ascontiguousarray(input_ids, dtype=np.int64).reshape(1, -1)
        where = np.flatnonzero(ids[0] == self.image_token_id)
        n = self.num_image_tokens
        if len(where) != n or where[-1] - where[0] != n - 1:
            raise FeatherError(f"input_ids must hold one contiguous block of {n} image tokens "
                               f"(id {self.image_token_id}); found {len(where)}")
        text_tokens = ids.shape[1] - n
        if text_tokens > self.manifest["max_text_tokens"]:
            raise FeatherError(f"the prompt has {text_tokens} text tokens; this artifact allows "
                               f"{self.manifest['max_text_tokens']} (--max-text-tokens at build)")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)):
            raise FeatherError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if not 1 <= max_new_tokens <= self.max_new_tokens_limit:
            raise FeatherError(f"max_new_tokens must be between 1 and {self.max_new_tokens_limit} "
                               "for this artifact (its --max-new-tokens at build)")
        return pixels, ids, int(where[0])

    def _run(self, name: str, inputs: dict, timings: dict | None = None) -> dict:
        """Run one segment on device tensors. With ``timings`` (prefill) the memory is synchronized
        so the time is the segment's own; decode steps are not synchronized per segment."""
        t = time.perf_counter()
        out = self.runners[name].run_device(inputs)
        if timings is not None:
            self.memory.synchronize()
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
        return out

    def _prefill(self, pixels, ids, start, timings):
        mem, ws, n = self.memory, self.workspace, self.num_image_tokens
        vision = self._run("vision", {"pixel_values": mem.upload(pixels, into=ws["pixel_values"])},
                           timings)
        features = vision["image_features"]
        kept = []                        # device tensors; downloaded once prefill is enqueued
        if self.method == "fastervlm":
            sel = self._run("select_0", {"cls_scores": vision["cls_scores"],
                                         "image_features": features}, timings)
            features = sel["pruned_image_features"]
            kept.append(sel["kept"])
        embeds = self._run("embed", {"input_ids": mem.upload(ids, into=ws["input_ids"])},
                           timings)["inputs_embeds"]
        hidden = self._merge(embeds, features, start)
        length = hidden.shape[1]
        positions = mem.upload(np.arange(length, dtype=np.int64)[None], into=ws["position_ids"])
        image_start = mem.upload(np.asarray(start, np.int64), into=ws["image_start"])
        for step in self.steps:
            step.cache.reset()
            out = self._run(step.span, {"inputs_embeds": hidden, "position_ids": positions,
                                        **step.cache.feeds(prefill=True)}, timings)
            step.cache.append(out)
            if step.select is None:
                logits = out["logits"]
                continue
            sel = self._run(step.select, {**{name: out[name] for name in step.passed},
                                          "position_ids": positions, "image_start": image_start},
                            timings)
            hidden, positions = sel["pruned_hidden_states"], sel["pruned_position_ids"]
            kept.append(sel["kept"])
        timings["selection"] = sum(v for k, v in timings.items() if k.startswith("select_"))
        original, kept_all = np.arange(n), []
        for k in kept:
            original = original[mem.download(k)]
            kept_all.append(original.tolist())
        last_position = int(mem.download(positions)[0, -1])
        return mem.download(logits).reshape(-1), kept_all, last_position + 1

    def _merge(self, embeds, features, start: int):
        """[text before the image | image features | text after] into the workspace's hidden
        buffer: three contiguous device copies (batch 1)."""
        if embeds.dtype != features.dtype:
            raise FeatherError(f"the artifact's embed segment gives {embeds.dtype} and its vision "
                               f"segment {features.dtype}; export it again")
        n, kept = self.num_image_tokens, features.shape[1]
        total = embeds.shape[1] - n + kept
        row = embeds.shape[2] * embeds.dtype.itemsize
        hidden = self.workspace["hidden"].view((1, total, embeds.shape[2]))
        after = embeds.shape[1] - start - n
        self.memory.copy(hidden.ptr, embeds.ptr, start * row)
        self.memory.copy(hidden.ptr + start * row, features.ptr, kept * row)
        self.memory.copy(hidden.ptr + (start + kept) * row, embeds.ptr + (start + n) * row,
                         after * row)
        return hidden

    def _decode_step(self, token: int, position: int) -> np.ndarray:
        mem, ws = self.memory, self.workspace
        ids = mem.upload(np.asarray([[token]], np.int64), into=ws["token"])
        hidden = self._run("embed", {"input_ids": ids})["inputs_embeds"]
        pos = mem.upload(np.asarray([[position]], np.int64), into=ws["position"])
        for step in self.steps:
            out = self._run(step.span, {"inputs_embeds": hidden, "position_ids": pos,
                                        **step.cache.feeds(prefill=False)})
            step.cache.append(out)
            hidden = out.get("hidden_states")
        return mem.download(out["logits"]).reshape(-1)


def check_runnable(manifest: Manifest) -> None:
    """Refuse an artifact the runtime cannot run, before any session or engine is created."""
    dtype = manifest["dtype"]
    if dtype == "bf16":
        raise FeatherError(
            f"{manifest.root} holds bf16 graphs, which feather_runtime does not run on any backend: "
            "ONNX Runtime has no bf16 kernels on CPU, and the runtime's host buffers (numpy) have no "
            "bf16. Export with --dtype fp16 (NVIDIA GPUs: ONNX Runtime CUDA, TensorRT) or --dtype "
            "fp32 (CPU)")
    if dtype not in NUMPY_DTYPES:
        raise FeatherError(f"{manifest.root} holds {dtype} graphs; feather_runtime runs fp32 and fp16 "
                           "artifacts")


def _close(backend) -> None:
    close = getattr(backend, "close", None)
    if close is not None:
        close()


def _stop_index(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
