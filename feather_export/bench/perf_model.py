"""The performance model of docs/design.md §5: FLOPs and bytes per segment, and roofline time per device.

Per Llama layer with n new tokens, P cached tokens, hidden d, FFN width m (SwiGLU, 3 matrices):

    FLOPs = 2 n (2 d q + 2 d kv + 3 d m) + 2 n^2 d + 4 n P d

with q = heads * head_dim and kv = kv_heads * head_dim; for multi-head attention (q = kv = d)
and P = 0 this is the design's 2 n (4 d^2 + 3 d m) + 2 n^2 d (causal). Only matrix products are
counted (norms, softmax, rotary and gathers are O(n d) and left out). The CLIP encoder is
non-causal: 2 n (4 c^2 + 2 c m_v) + 4 n^2 c per layer with n = N + 1 (CLS). Bytes moved are a
lower bound: every weight once, plus the KV rows read and written and the activations in and out.

Roofline time of a segment = max(FLOPs / peak, bytes / bandwidth). Nothing here imports torch;
``measure_cpu_device`` times ONNX Runtime and numpy kernels on this machine.
"""
from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field

from feather_export.errors import FeatherError

ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


@dataclass(frozen=True)
class WeightFormat:
    """How an artifact stores its decoder linears and lm_head (the manifest's ``quantization``)."""
    kind: str = "float"          # float | int8 | int4
    block_size: int = 128
    lm_head: str = "float"

    @classmethod
    def from_manifest(cls, record: dict | None) -> "WeightFormat":
        record = record or {}
        return cls(record.get("weights", "float"), record.get("block_size") or 128,
                   record.get("lm_head", "float"))

    @property
    def label(self) -> str:
        return "" if self.kind == self.lm_head == "float" else (
            f"+{self.kind}" + (f"/head-{self.lm_head}" if self.lm_head != "float" else ""))


def linear_bytes(k: int, n: int, kind: str, block_size: int, elem: int) -> float:
    """Stored bytes of a [K, N] linear weight: float, int8 (+ N scales), int4 (0.5 byte + a scale
    per block of the input width)."""
    if kind == "int8":
        return float(k * n + n * elem)
    if kind == "int4":
        return k * n / 2 + -(-k // block_size) * n * elem
    return float(k * n * elem)


# ---- geometry ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class LlmGeometry:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def layer_params(self) -> int:
        d, q, kv, m = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        return d * q + 2 * d * kv + q * d + 3 * d * m + 2 * d       # q, k, v, o, FFN, 2 norms


@dataclass(frozen=True)
class VisionGeometry:
    image_size: int
    patch_size: int
    hidden: int              # CLIP width c
    intermediate: int        # CLIP MLP width m_v (fc1, fc2)
    layers: int              # CLIP layers that run (up to the feature layer)
    projector_hidden: int    # width of the projector's first linear
    out_hidden: int          # LLM hidden d

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def layer_params(self) -> int:
        c, m = self.hidden, self.intermediate
        return 4 * c * c + 4 * c + 2 * c * m + m + c + 4 * c          # attn (+biases), MLP, 2 LNs

    def params(self) -> int:
        c, p, n = self.hidden, self.patch_size, self.num_patches
        embed = 3 * p * p * c + c + (n + 1) * c + 2 * c                # conv, CLS, positions, pre-LN
        proj = c * self.projector_hidden + self.projector_hidden + \
            self.projector_hidden * self.out_hidden + self.out_hidden
        return embed + self.layers * self.layer_params() + proj


@dataclass(frozen=True)
class ModelShape:
    llm: LlmGeometry
    vision: VisionGeometry
    crops: int = 1                         # images through the tower (LLaVA-NeXT: base + grid)
    image_tokens: int | None = None        # N when it is not the patch count (NeXT: + newlines)

    @property
    def num_image_tokens(self) -> int:
        return self.image_tokens if self.image_tokens is not None else self.vision.num_patches

    @property
    def grid_side(self) -> int:
        return self.vision.image_size // self.vision.patch_size


@dataclass(frozen=True)
class Cost:
    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


# ---- FLOPs ---------------------------------------------------------------------------------------

def decoder_layer_flops(n: int, d: int, m: int, past: int = 0, q_dim: int | None = None,
                        kv_dim: int | None = None) -> float:
    """docs/design.md §5 FLOPs of one Llama layer for n new tokens over ``past`` cached ones."""
    q = d if q_dim is None else q_dim
    kv = d if kv_dim is None else kv_dim
    proj = 2 * n * (2 * d * q + 2 * d * kv + 3 * d * m)
    return float(proj + 2 * n * n * q + 4 * n * past * q)


def vision_layer_flops(n: int, c: int, m: int) -> float:
    """One CLIP layer on n tokens (non-causal attention)."""
    return float(2 * n * (4 * c * c + 2 * c * m) + 4 * n * n * c)


def vision_cost(shape: ModelShape, elem: int) -> Cost:
    """The tower and projector on every crop (one crop on LLaVA-1.5)."""
    v, crops, out_n = shape.vision, shape.crops, shape.num_image_tokens
    n = v.num_patches
    flops = 2 * n * 3 * v.patch_size ** 2 * v.hidden                 # patch embedding
    flops += v.layers * vision_layer_flops(n + 1, v.hidden, v.intermediate)
    flops += 2 * n * (v.hidden * v.projector_hidden + v.projector_hidden * v.out_hidden)
    act = crops * (3 * v.image_size ** 2 * 4) + out_n * v.out_hidden * elem + out_n * 4
    return Cost(float(crops * flops), float(v.params() * elem + act))


def embed_cost(llm: LlmGeometry, seq: int, elem: int) -> Cost:
    """A gather: no FLOPs; the rows read and written (not the whole table)."""
    return Cost(0.0, float(2 * seq * llm.hidden * elem + seq * 8))


def span_cost(llm: LlmGeometry, layers: int, n: int, past: int, final: bool, elem: int,
              score_criterion: str | None = None, weights: WeightFormat | None = None) -> Cost:
    """``layers`` decoder layers on n new tokens over ``past`` cached ones (+ norm and lm_head on
    the last position when ``final``). A span before a prune point also outputs the scoring
    inputs of its last layer: the last query, and for FEATHER the keys before RoPE."""
    d = llm.hidden
    flops = layers * decoder_layer_flops(n, d, llm.intermediate, past, llm.q_dim, llm.kv_dim)
    fmt = weights or WeightFormat()
    d, q, kv_d, m = llm.hidden, llm.q_dim, llm.kv_dim, llm.intermediate
    linears = ((d, q + 2 * kv_d), (q, d), (d, 2 * m), (m, d))        # qkv, o, gate_up, down
    weight_bytes = layers * (sum(linear_bytes(k, w, fmt.kind, fmt.block_size, elem)
                                 for k, w in linears) + 2 * d * elem)
    kv = layers * 2 * llm.kv_dim * (past + n) * elem                   # read the past, write new
    act = n * d * elem + n * 8                                         # hidden and positions in
    if final:
        flops += 2 * d * llm.vocab
        weight_bytes += linear_bytes(d, llm.vocab, fmt.lm_head, fmt.block_size, elem) + d * elem
        act += llm.vocab * 4
    else:
        act += n * d * elem
    if score_criterion is not None:
        act += llm.q_dim * elem + (n * llm.kv_dim * elem if score_criterion == "feather" else 0)
    return Cost(float(flops), float(weight_bytes + kv + act))


def select_cost(llm: LlmGeometry, criterion: str, seq: int, num_in: int, keep: int,
                elem: int) -> Cost:
    """A ``select_K`` segment: last-query x key dot products (the query and keys come from the
    span before, so no projection is recomputed), softmax, TopK and the gather. FEATHER scores
    the ``num_in`` image keys; FastV the whole causal row (its cached keys)."""
    d = llm.hidden
    out_seq = seq - num_in + keep
    if criterion == "fastervlm":                                       # select_0: gather only
        return Cost(0.0, float((num_in + keep) * d * elem + num_in * 4))
    gather = seq * d * elem + out_seq * d * elem + seq * 8
    if criterion == "btp" and keep == 0:                               # drops every image row
        return Cost(0.0, float(gather))
    keys = seq if criterion == "fastv" else num_in
    flops = 2 * keys * llm.q_dim
    act = (llm.q_dim + keys * llm.kv_dim) * elem + gather
    if criterion == "btp":     # unit rows, D = 1 - cos (n x n x d), the fill reads rows of D
        flops += 3 * num_in * d + 2 * num_in * num_in * d + 2 * keep * num_in
        act += 2 * num_in * d * 4 + num_in * num_in * 4 + keep * num_in * 4
    return Cost(float(flops), float(act))


# ---- segment plans -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SegmentCost:
    name: str
    kind: str
    cost: Cost
    tokens: int = 0            # tokens entering the segment (decoder: new tokens)
    past: int = 0


def _score_criterion(seg, stages) -> str | None:
    """The criterion of the select segment after a span (None for the last span)."""
    if seg.score_layer is None:
        return None
    return next(s.criterion for s in stages if s.layer == seg.layers[1])


def _stages(prune) -> list:
    return list(prune.stages) if prune is not None else []


def prefill_costs(shape: ModelShape, prune, text_tokens: int, dtype: str,
                  weights: WeightFormat | None = None) -> list[SegmentCost]:
    """Every prefill segment of an artifact with ``prune`` (a ``PruneConfig``), in run order, named
    as the exporter names them."""
    from feather_export.methods.config import PruneConfig
    from feather_export.export.artifact import plan_segments   # names and order from the exporter (no torch import)

    elem = ELEMENT_BYTES[dtype]
    llm, n_img = shape.llm, shape.num_image_tokens
    stages = _stages(prune)
    cfg = prune if prune is not None else PruneConfig("none", ())
    seq = text_tokens + n_img
    out = []
    for seg in plan_segments(llm.layers, cfg):
        if seg.kind == "vision":
            out.append(SegmentCost(seg.name, "vision", vision_cost(shape, elem), n_img + 1))
        elif seg.kind == "embed":
            out.append(SegmentCost(seg.name, "embed", embed_cost(llm, text_tokens + n_img, elem),
                                   text_tokens + n_img))
        elif seg.kind == "decoder":
            a, b = seg.layers
            out.append(SegmentCost(seg.name, "decoder",
                                   span_cost(llm, b - a, seq, 0, b == llm.layers, elem,
                                             score_criterion=_score_criterion(seg, stages),
                                             weights=weights),
                                   seq))
        else:
            st = stages[seg.stage]
            scored = n_img if st.criterion == "fastervlm" else seq
            out.append(SegmentCost(seg.name, "select",
                                   select_cost(llm, st.criterion, scored, st.num_in, st.keep,
                                               elem), scored))
            seq = (text_tokens + st.keep if st.criterion == "fastervlm"
                   else seq - st.num_in + st.keep)
    return out


def decode_costs(shape: ModelShape, prune, cache_len: int, dtype: str,
                 weights: WeightFormat | None = None) -> list[SegmentCost]:
    """One decode step (S = 1) when the unpruned sequence so far has ``cache_len`` tokens: embed,
    then every decoder span against its own cache (shorter after each prune point)."""
    from feather_export.methods.config import PruneConfig
    from feather_export.export.artifact import plan_segments

    elem = ELEMENT_BYTES[dtype]
    llm = shape.llm
    stages = _stages(prune)
    cfg = prune if prune is not None else PruneConfig("none", ())
    dropped = sum(s.num_in - s.keep for s in stages if s.criterion == "fastervlm")
    by_layer = {s.layer: s for s in stages if s.criterion != "fastervlm"}
    out = [SegmentCost("embed", "embed", embed_cost(llm, 1, elem), 1)]
    for seg in plan_segments(llm.layers, cfg):
        if seg.kind != "decoder":
            continue
        a, b = seg.layers
        if a in by_layer:
            dropped += by_layer[a].num_in - by_layer[a].keep
        past = cache_len - dropped
        out.append(SegmentCost(seg.name, "decoder",
                               span_cost(llm, b - a, 1, past, b == llm.layers, elem,
                                         score_criterion=_score_criterion(seg, stages),
                                         weights=weights), 1, past))
    return out


def total(costs) -> Cost:
    acc = Cost()
    for c in costs:
        acc = acc + c.cost
    return acc


# ---- devices and roofline ------------------------------------------------------------------------

@dataclass(frozen=True)
class Device:
    key: str
    name: str
    peak_flops: dict            # dtype -> FLOP/s (dense)
    bandwidth: float            # bytes/s
    source: str
    measured: dict = field(default_factory=dict)

    def peak(self, dtype: str) -> float:
        if dtype in self.peak_flops:
            return self.peak_flops[dtype]
        if dtype == "bf16" and "fp16" in self.peak_flops:
            return self.peak_flops["fp16"]
        raise FeatherError(f"no {dtype} peak is known for {self.name}; known: "
                           f"{', '.join(self.peak_flops)}")

    def to_dict(self) -> dict:
        return {"key": self.key, "name": self.name, "peak_flops": self.peak_flops,
                "bandwidth": self.bandwidth, "source": self.source, "measured": self.measured}


_T = 1e12
DEVICES: dict[str, Device] = {
    "h100-sxm": Device("h100-sxm", "NVIDIA H100 SXM",
                       {"fp16": 989 * _T, "bf16": 989 * _T, "fp32": 67 * _T}, 3.35e12,
                       "NVIDIA H100 datasheet: 989 TFLOP/s dense fp16/bf16 tensor, 67 fp32, "
                       "3.35 TB/s HBM3"),
    "h200": Device("h200", "NVIDIA H200",
                   {"fp16": 989 * _T, "bf16": 989 * _T, "fp32": 67 * _T}, 4.8e12,
                   "NVIDIA H200 datasheet: H100 compute, 4.8 TB/s HBM3e"),
    "a100": Device("a100", "NVIDIA A100 (80 GB SXM)",
                   {"fp16": 312 * _T, "bf16": 312 * _T, "fp32": 19.5 * _T}, 2.0e12,
                   "NVIDIA A100 datasheet: 312 TFLOP/s dense fp16/bf16, 19.5 fp32, 2.0 TB/s"),
    "agx-orin": Device("agx-orin", "Jetson AGX Orin 64GB",
                       {"fp16": 42.5 * _T, "bf16": 42.5 * _T, "fp32": 5.3 * _T}, 204.8e9,
                       "docs/design.md §5: ~42 TFLOP/s fp16 dense (16 SMs at 1.3 GHz); fp32 = 2048 CUDA "
                       "cores x 2 x 1.3 GHz; 204.8 GB/s LPDDR5"),
    "orin-nano": Device("orin-nano", "Jetson Orin Nano 8GB",
                        {"fp16": 10.2 * _T, "bf16": 10.2 * _T, "fp32": 1.28 * _T}, 68e9,
                        "assumption: AGX Orin's per-SM tensor rate (42.5 TFLOP/s / 16 SMs / 1.3 GHz) "
                        "x 8 SMs x 625 MHz = ~10 TFLOP/s fp16 dense (JetPack 6.2 'super' 1020 MHz: "
                        "~16.7); fp32 = 1024 cores x 2 x 625 MHz; 68 GB/s LPDDR5 (datasheet)"),
}


def roofline_seconds(cost: Cost, device: Device, dtype: str) -> float:
    return max(cost.flops / device.peak(dtype), cost.bytes / device.bandwidth)


def get_device(key: str) -> Device:
    if key not in DEVICES:
        raise FeatherError(f"unknown device {key!r}; choose cpu (measured here) or one of "
                           f"{', '.join(DEVICES)}")
    return DEVICES[key]


def device_for_gpu_name(gpu_name: str) -> Device | None:
    """Map an nvidia-smi / torch device name to the table (None when unknown)."""
    name = gpu_name.lower()
    for pattern, key in ((r"h200", "h200"), (r"h100", "h100-sxm"), (r"a100", "a100"),
                         (r"orin nano|orin.*nano", "orin-nano"), (r"orin", "agx-orin")):
        if re.search(pattern, name):
            return DEVICES[key]
    return None


# ---- CPU micro-benchmarks ------------------------------------------------------------------------

def _best_time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _ort_matmul_session(m: int, k: int, n: int, threads: int | None):
    import numpy as np
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    w = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", 1, [1, m, k])],
        [helper.make_tensor_value_info("y", 1, [1, m, n])],
        initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, m, k), dtype=np.float32)
    return lambda: session.run(None, {"x": x})


def measure_cpu_device(quick: bool = False, threads: int | None = None) -> Device:
    """Peak fp32 FLOP/s (best of ONNX Runtime MatMul and numpy matmul over a few GEMM shapes) and
    memory bandwidth (best of numpy copy, counted read + write, and ONNX Runtime GEMV streaming a
    weight far larger than the caches). ``quick`` uses small sizes (seconds, for tests)."""
    import numpy as np

    repeats = 2 if quick else 4
    gemms = [(256, 512, 512)] if quick else [(576, 2048, 5632), (1024, 4096, 4096),
                                            (576, 5632, 2048)]
    measured = {}
    ort_best = 0.0
    for m, k, n in gemms:
        t = _best_time(_ort_matmul_session(m, k, n, threads), repeats)
        rate = 2 * m * k * n / t
        measured[f"ort_matmul_{m}x{k}x{n}_flops"] = rate
        ort_best = max(ort_best, rate)
    side = 512 if quick else 2048
    a = np.random.default_rng(0).standard_normal((side, side), dtype=np.float32)
    np_rate = 2 * side ** 3 / _best_time(lambda: a @ a, repeats)
    measured[f"numpy_matmul_{side}_flops"] = np_rate
    elems = (16 if quick else 64) << 20
    src = np.ones(elems, np.float32)
    dst = np.empty_like(src)
    copy_bw = 2 * src.nbytes / _best_time(lambda: np.copyto(dst, src), repeats)
    measured["numpy_copy_bandwidth"] = copy_bw
    k, n = (1024, 4096) if quick else (4096, 16384)
    gemv_bw = k * n * 4 / _best_time(_ort_matmul_session(1, k, n, threads), repeats * 3)
    measured["ort_gemv_bandwidth"] = gemv_bw
    import onnxruntime
    peak = max(ort_best, np_rate)
    return Device("cpu", cpu_model_name(), {"fp32": peak, "fp16": peak}, max(copy_bw, gemv_bw),
                  f"measured here ({'quick' if quick else 'full'} micro-benchmark, ONNX Runtime "
                  f"{onnxruntime.__version__}, {threads or os.cpu_count()} threads): peak = best "
                  "of ORT MatMul and numpy matmul; bandwidth = best of numpy copy (read+write) and "
                  "ORT GEMV; fp16 uses the fp32 figure (ORT CPU has no fast fp16 GEMM)",
                  measured)


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or platform.machine()


# ---- shapes from artifacts -----------------------------------------------------------------------

def vision_geometry_from_onnx(path, image_size: int, out_hidden: int) -> VisionGeometry:
    """The CLIP geometry from the vision segment's weight names and shapes (no external data)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    try:
        hidden, _, patch, _ = dims["patch_embedding.weight"]
        layers = len({m.group(1) for name in dims
                      if (m := re.match(r"vision\.layers\.(\d+)\.fc1\.weight$", name))})
        intermediate = dims["vision.layers.0.fc1.weight"][1]
        projector_hidden = dims["projector.linear_1.weight"][1]
    except (KeyError, ValueError) as exc:
        raise FeatherError(f"{path} does not look like a feather-export vision segment "
                           f"({exc})") from None
    return VisionGeometry(image_size, patch, hidden, intermediate, layers, projector_hidden,
                          out_hidden)


def shape_from_manifest(manifest) -> ModelShape:
    m = manifest["model"]
    llm = LlmGeometry(m["num_layers"], m["hidden_size"], m["num_attention_heads"],
                      m["num_key_value_heads"], m["head_dim"], m["intermediate_size"],
                      m["vocab_size"])
    vision = m.get("vision")
    if vision:            # manifests that carry the vision geometry (proposed field)
        vg = VisionGeometry(m["image_size"], vision["patch_size"], vision["hidden_size"],
                            vision["intermediate_size"], vision["layers_run"],
                            vision["projector_hidden"], m["hidden_size"])
    else:
        seg = manifest.segment("vision")
        vg = vision_geometry_from_onnx(manifest.root / seg.file, m["image_size"], m["hidden_size"])
    return ModelShape(llm, vg)


def shape_from_config(config, resolution=None) -> ModelShape:
    """From a transformers ``LlavaConfig`` / ``LlavaNextConfig`` (``resolution``: NeXT's pinpoint,
    default the largest square one)."""
    text, vision = config.text_config, config.vision_config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    num = vision.num_hidden_layers
    layers_run = config.vision_feature_layer % (num + 1)
    llm = LlmGeometry(text.num_hidden_layers, text.hidden_size, heads, text.num_key_value_heads,
                      head_dim, text.intermediate_size, text.vocab_size)
    vg = VisionGeometry(vision.image_size, vision.patch_size, vision.hidden_size,
                        vision.intermediate_size, layers_run, text.hidden_size, text.hidden_size)
    from feather_export.models.family import model_kind

    if model_kind(config).anyres:
        from feather_export.models.geometry import geometry_of

        geo = geometry_of(config, resolution)
        return ModelShape(llm, vg, crops=len(geo.crops()), image_tokens=geo.num_image_tokens)
    return ModelShape(llm, vg)
