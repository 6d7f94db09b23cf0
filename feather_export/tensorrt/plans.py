"""TensorRT engine plans for an artifact: optimization profiles, engine file names, the equivalent
``trtexec`` command line, and the reuse index ``engines/engines.json``.

Pure Python: nothing here imports tensorrt, so every rule below is unit-tested on CPU machines.

Profiles (docs/design.md §2-§3: one engine per segment, prefill and decode share the weights):

* ``embed``: profile 0 "prefill" ``seq`` = N .. N + T (the prompt's input_ids hold N image
  placeholders plus up to T text tokens), profile 1 "decode" ``seq`` = 1.
* ``decoder_a_b``: with n = the image tokens entering the span (N before the first prune point,
  the stage's kept count after it; FasterVLM: its kept count everywhere), profile 0 "prefill"
  ``seq`` = n .. n + T with cache ``capacity`` = 0 (empty cache: TensorRT 10 allows zero-length
  profile dimensions, ``0 <= min <= opt <= max``, IOptimizationProfile::setDimensions in
  include/NvInferRuntime.h of TensorRT v10.3.0), profile 1 "decode" ``seq`` = 1 with
  ``capacity`` fixed at n + T + G (min = opt = max: the runtime's static per-span KV cache holds
  n + T + G rows and a decode step feeds the whole buffer; ``past_length``, the number of valid
  rows, is a scalar input and needs no profile).
* ``select_K``: one profile, ``seq`` = n_in .. n_in + T (selection never runs in decode).
* ``vision`` and FasterVLM's ``select_0`` have static shapes: no profile is needed.

opt: a typical prompt of ``OPT_TEXT_TOKENS`` text tokens (clamped to the artifact's limit).

Engine names: ``engines/<segment>[.b<budget>].<precision>.plan``. The budget suffix marks engines
that depend on the budget: select segments (graph) and decoder spans after a prune point (their
profiles are sized by the kept count). Vision, embed and the spans before the first prune point
are budget-independent and can be shared between artifacts built for different budgets.

Reuse: an engine is reused when its key matches. The key hashes what determines the engine: the
segment's ONNX sha256 (and external data), precision and typing mode, the profiles, TensorRT
version, GPU, plugin library hash (select segments) and builder options. Timing caches only speed
up a build and are not part of the key.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from feather_export.errors import FeatherError

PRECISIONS = ("fp32", "fp16", "bf16")
OPT_TEXT_TOKENS = 32
OPT_NEW_TOKENS = 64
ENGINES_DIR = "engines"
INDEX_NAME = "engines.json"
INDEX_FORMAT = "feather-engines"
INDEX_VERSION = 1
TIMING_CACHE_NAME = "timing.cache"
PLUGIN_LIBRARY_NAME = "libfeather_plugin.so"
PREFILL, DECODE = "prefill", "decode"


@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def __post_init__(self) -> None:
        if not len(self.min) == len(self.opt) == len(self.max):
            raise FeatherError(f"profile shapes differ in rank: {self}")
        for lo, mid, hi in zip(self.min, self.opt, self.max):
            if not 0 <= lo <= mid <= hi:
                raise FeatherError(f"profile needs 0 <= min <= opt <= max per dimension; got {self}")

    def to_dict(self) -> dict:
        return {"min": list(self.min), "opt": list(self.opt), "max": list(self.max)}


@dataclass(frozen=True)
class Profile:
    """One optimization profile: min/opt/max for every *dynamic* input (static ones need none)."""

    role: str                                     # "prefill" | "decode"
    shapes: tuple[tuple[str, ShapeRange], ...]

    def to_dict(self) -> dict:
        return {"role": self.role, "shapes": {name: r.to_dict() for name, r in self.shapes}}


@dataclass(frozen=True)
class EnginePlan:
    """Everything that determines one segment's engine, except the machine it is built on."""

    segment: str
    kind: str
    onnx: str                      # relative to the artifact directory
    onnx_sha256: str
    data_sha256: tuple[str, ...]   # external data files, if any
    engine: str                    # relative to the artifact directory
    precision: str                 # fp32 | fp16 | bf16
    artifact_dtype: str
    strongly_typed: bool           # True: tensor types exactly as in the ONNX graph
    budget_dependent: bool
    uses_select_op: bool           # holds feather::SelectTokens (plugin or function body)
    profiles: tuple[Profile, ...] = field(default=())

    def spec(self) -> dict:
        return {"segment": self.segment, "onnx_sha256": self.onnx_sha256,
                "data_sha256": list(self.data_sha256), "precision": self.precision,
                "strongly_typed": self.strongly_typed,
                "profiles": [p.to_dict() for p in self.profiles]}

    def key(self, environment: dict) -> str:
        """Reuse key: this plan's spec plus the build environment (TensorRT version, GPU, plugin
        hash, builder options), canonical JSON hashed with sha256."""
        blob = json.dumps({"spec": self.spec(), "env": environment}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def precision_flags(self) -> list[str]:
        if self.strongly_typed:
            return ["--stronglyTyped"]
        return [f"--{self.precision}"]            # fp32 artifact, reduced-precision tactics allowed

    def trtexec_command(self, root: str | os.PathLike = ".", *, plugin_library=None,
                        timing_cache=None, workspace_mib: int | None = None,
                        tf32: bool = False) -> list[str]:
        """The ``trtexec`` command line that builds the same engine (TensorRT 10.x option names,
        samples/common/sampleOptions.cpp)."""
        root = Path(root)
        argv = ["trtexec", f"--onnx={root / self.onnx}", f"--saveEngine={root / self.engine}",
                *self.precision_flags()]
        if not tf32:
            argv.append("--noTF32")
        for index, profile in enumerate(self.profiles):
            argv.append(f"--profile={index}")
            for which in ("min", "opt", "max"):
                spec = ",".join(f"{name}:{_dims(getattr(r, which))}" for name, r in profile.shapes)
                argv.append(f"--{which}Shapes={spec}")
        if self.uses_select_op and plugin_library is not None:
            argv.append(f"--dynamicPlugins={plugin_library}")
        if timing_cache is not None:
            argv.append(f"--timingCacheFile={timing_cache}")
        if workspace_mib is not None:
            argv.append(f"--memPoolSize=workspace:{int(workspace_mib)}M")
        argv.append("--skipInference")
        return argv


def format_command(argv: list[str]) -> str:
    return shlex.join(str(a) for a in argv)


def engine_file(segment: str, precision: str, budget: int | None) -> str:
    suffix = f".b{budget}" if budget is not None else ""
    return f"{ENGINES_DIR}/{segment}{suffix}.{precision}.plan"


def resolve_precision(artifact_dtype: str, precision: str | None, *,
                      strongly_typed_only: str | None = None) -> tuple[str, bool]:
    """(precision, strongly_typed). ``None`` means the artifact's dtype, built strongly typed, so
    the fp32 islands of fp16/bf16 graphs (norms, softmax, scores) stay fp32. fp16/bf16 on an fp32
    artifact is a weakly typed build with that builder flag: TensorRT may pick reduced-precision
    tactics per layer while the engine's inputs and outputs stay fp32.

    ``strongly_typed_only``: the TensorRT version when it builds strongly typed networks only
    (TensorRT 11 removed the FP16/BF16 builder flags); then the precision is the artifact's dtype
    and any other is refused."""
    if precision is None:
        precision = artifact_dtype
    if precision not in PRECISIONS:
        raise FeatherError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == artifact_dtype:
        return precision, True
    if strongly_typed_only:
        raise FeatherError(
            f"TensorRT {strongly_typed_only} builds strongly typed networks only (TensorRT 11 removed "
            f"the FP16/BF16 builder flags): engines take the artifact's dtype, {artifact_dtype}. "
            f"Build without --precision, or export again with --dtype {precision} for {precision} "
            "engines (weakly typed reduced-precision builds of an fp32 artifact need TensorRT 10.x)")
    if artifact_dtype == "fp32":
        return precision, False
    raise FeatherError(f"this artifact holds {artifact_dtype} graphs; build {artifact_dtype} engines "
                       f"or export again with --dtype {precision} (or fp32)")


def plan_engines(manifest: dict, precision: str | None = None, *,
                 opt_text_tokens: int = OPT_TEXT_TOKENS,
                 opt_new_tokens: int = OPT_NEW_TOKENS,
                 strongly_typed_only: str | None = None) -> list[EnginePlan]:
    """One plan per segment of a manifest (``Manifest.data``), in the manifest's order.

    ``opt_new_tokens`` no longer shapes anything (decode profiles have a fixed cache capacity); it
    is accepted for callers of the earlier signature. ``strongly_typed_only``: see
    ``resolve_precision``."""
    precision, strongly_typed = resolve_precision(manifest["dtype"], precision,
                                                  strongly_typed_only=strongly_typed_only)
    model, stages = manifest["model"], manifest["prune"]["stages"]
    n_total = model["num_image_tokens"]
    text, new = manifest["max_text_tokens"], manifest["max_new_tokens"]
    opt_text = min(opt_text_tokens, text)
    budget = stages[0]["keep"] if stages else None
    n_img = stages[0]["keep"] if manifest["prune"]["method"] == "fastervlm" else n_total
    plans = []
    for seg in manifest["segments"]:
        kind = seg["kind"]
        if kind == "embed":
            ranges = [(PREFILL, {"seq": (n_total, n_total + opt_text, n_total + text)}),
                      (DECODE, {"seq": (1, 1, 1)})]
            dependent = False
        elif kind == "decoder":
            capacity = n_img + text + new           # the runtime's SpanCache for this span
            ranges = [(PREFILL, {"seq": (n_img, n_img + opt_text, n_img + text),
                                 "capacity": (0, 0, 0)}),
                      (DECODE, {"seq": (1, 1, 1), "capacity": (capacity,) * 3})]
            dependent = n_img != n_total
        elif kind == "select":
            stage = stages[seg["stage"]]
            n_in = stage["num_in"]
            ranges = [(PREFILL, {"seq": (n_in, n_in + opt_text, n_in + text)})]
            dependent = True
            if stage["criterion"] != "fastervlm":
                n_img = stage["keep"]
        elif kind == "vision":
            ranges, dependent = [], False
        else:
            raise FeatherError(f"segment {seg['name']!r} has unknown kind {kind!r}; this version "
                               "of the engine builder knows vision, embed, decoder and select")
        profiles = tuple(p for p in (_profile(seg, role, dims) for role, dims in ranges) if p)
        plans.append(EnginePlan(
            segment=seg["name"], kind=kind, onnx=seg["file"], onnx_sha256=seg["sha256"],
            data_sha256=tuple(d["sha256"] for d in seg.get("data_files", ())),
            engine=engine_file(seg["name"], precision, budget if dependent else None),
            precision=precision, artifact_dtype=manifest["dtype"], strongly_typed=strongly_typed,
            budget_dependent=dependent, uses_select_op=kind == "select", profiles=profiles))
    return plans


def _profile(seg: dict, role: str, dims: dict) -> Profile | None:
    """Min/opt/max for the segment's dynamic inputs; None when every input is static."""
    shapes = []
    for inp in seg["inputs"]:
        if all(isinstance(d, int) for d in inp["shape"]):
            continue
        triple = ([], [], [])
        for d in inp["shape"]:
            if isinstance(d, int):
                values = (d, d, d)
            elif d in dims:
                values = dims[d]
            else:
                raise FeatherError(f"segment {seg['name']!r} input {inp['name']!r} has dynamic "
                                   f"dimension {d!r}; this builder sizes {', '.join(sorted(dims))}")
            for out, v in zip(triple, values):
                out.append(int(v))
        shapes.append((inp["name"], ShapeRange(*(tuple(t) for t in triple))))
    return Profile(role, tuple(shapes)) if shapes else None


def _dims(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


class EngineIndex:
    """``engines/engines.json``: one entry per built engine, keyed by (segment, precision).

    ``default_precision`` is written only when every segment has an engine of that precision, so
    an interrupted build never looks complete to the runtime.
    """

    def __init__(self, path: Path, data: dict):
        self.path = Path(path)
        self.data = data

    @classmethod
    def load(cls, engines_dir: str | os.PathLike) -> "EngineIndex":
        path = Path(engines_dir) / INDEX_NAME
        if not path.is_file():
            return cls(path, {"format": INDEX_FORMAT, "format_version": INDEX_VERSION,
                              "default_precision": None, "engines": []})
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise FeatherError(f"{path} is not valid JSON ({exc}); delete it and build the engines "
                               "again") from None
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise FeatherError(f"{path} is not a feather-export engine index")
        if data.get("format_version") != INDEX_VERSION:
            raise FeatherError(f"{path} has index format {data.get('format_version')}; this version "
                               f"reads {INDEX_VERSION}. Delete it and build the engines again")
        return cls(path, data)

    @property
    def entries(self) -> list[dict]:
        return self.data["engines"]

    def find(self, segment: str, precision: str) -> dict | None:
        return next((e for e in self.entries
                     if e["segment"] == segment and e["precision"] == precision), None)

    def find_key(self, key: str) -> dict | None:
        return next((e for e in self.entries if e["key"] == key), None)

    def put(self, entry: dict) -> None:
        self.data["engines"] = [e for e in self.entries
                                if (e["segment"], e["precision"]) != (entry["segment"],
                                                                      entry["precision"])]
        self.data["engines"].append(entry)

    def is_current(self, entry: dict | None, key: str, root: Path, verify: bool = True) -> bool:
        """The recorded engine has this key and its file is intact."""
        from feather_runtime.manifest import sha256_file

        if entry is None or entry.get("key") != key:
            return False
        file = Path(root) / entry["file"]
        if not file.is_file() or file.stat().st_size != entry.get("size"):
            return False
        return not verify or sha256_file(file) == entry["sha256"]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)
