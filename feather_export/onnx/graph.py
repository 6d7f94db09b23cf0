"""A small ONNX graph builder: nodes, initializers and typed I/O, with generated unique names."""
from __future__ import annotations

import itertools

import numpy as np

OPSET = 17          # TensorRT 10.3 (JetPack 6) parses opsets up to 20; 17 has LayerNormalization
QUANT_OPSET = 21    # DequantizeLinear with INT4 and block_size (graphs holding quantized weights only)
FEATHER_DOMAIN = "feather"

DTYPES = {"fp32": 1, "fp16": 10, "bf16": 16}          # onnx.TensorProto element types
_NUMPY_TYPES = {np.dtype("float32"): 1, np.dtype("float16"): 10, np.dtype("int64"): 7,
                np.dtype("int32"): 6, np.dtype("bool"): 9}


def torch_bytes(tensor, elem_type: int) -> np.ndarray:
    """A torch tensor converted to ``elem_type``, as its raw little-endian bytes (a flat uint8
    array sharing the converted tensor's memory: no further copy). Conversions between float
    types are exact where they widen and round once where they narrow, as loading in fp32 and
    converting would."""
    import torch

    torch_type = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16}[elem_type]
    t = tensor.detach().cpu().to(torch_type).contiguous()
    return (t.view(torch.int16) if elem_type == 16 else t).numpy().reshape(-1).view(np.uint8)


SCALE_TYPES = {1: np.float32, 10: np.float16}             # bf16 artifacts are not quantized
INT8, INT4 = 3, 22                                          # onnx.TensorProto element types


class GraphBuilder:
    """Collects nodes and initializers; ``op`` returns the output name(s) of the new node."""

    def __init__(self, name: str, opset: int = OPSET, store=None):
        """``opset``: QUANT_OPSET for graphs that hold quantized weights, else the default.
        ``store``: an ``InitializerStore`` that weights are written into as they are added
        (external data, nothing kept in memory); None keeps them in the graph."""
        self.name = name
        self.store = store
        self.nodes, self.initializers, self.inputs, self.outputs = [], [], [], []
        self._counter = itertools.count()
        self._consts: dict[tuple, str] = {}
        self.opset = opset

    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._counter)}"

    def op(self, op_type: str, *inputs: str, outputs: int | list[str] = 1, name: str | None = None,
           domain: str = "", **attrs):
        from onnx import helper

        node_name = name or self.fresh(op_type)
        if isinstance(outputs, int):
            outputs = [f"{node_name}_out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=node_name,
                                           domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def weight(self, name: str, tensor, elem_type: int) -> str:
        """An initializer from a torch tensor, converted to ``elem_type``."""
        self.add_raw(name, elem_type, list(tensor.shape), torch_bytes(tensor, elem_type))
        return name

    def add_raw(self, name: str, elem_type: int, dims: list[int], raw) -> None:
        """An initializer from its raw bytes (bytes or a flat uint8 array): into the store if
        there is one, else inline."""
        from onnx import TensorProto

        if self.store is not None:
            self.initializers.append(self.store.add(name, elem_type, dims, raw))
            return
        proto = TensorProto(name=name, data_type=elem_type, dims=dims)
        proto.raw_data = bytes(raw)
        self.initializers.append(proto)

    def quantized_weight(self, name: str, tensor, elem_type: int, quant) -> str:
        """A ``[K, N]`` weight stored quantized (``quant``: a ``WeightQuant``), returned as the
        output of its ``DequantizeLinear`` (in ``elem_type``, the MatMul's type). Only this one
        tensor is converted to fp32 for quantization."""
        from feather_export.onnx.quantize import quantize

        if self.opset < QUANT_OPSET:
            raise ValueError(f"graph {self.name} was created at opset {self.opset}; quantized "
                             f"weights need GraphBuilder(..., opset={QUANT_OPSET})")
        from feather_export.onnx.quantize import pack_int4

        qw = quantize(tensor.detach().float().cpu().numpy(), quant.kind, quant.block_size,
                      SCALE_TYPES[elem_type])
        k, n = qw.codes.shape
        if qw.block is None:          # INT8 [K, N]; INT4 packed two per byte
            self.add_raw(f"{name}_quantized", INT8, [k, n], qw.codes.tobytes())
        else:
            self.add_raw(f"{name}_quantized", INT4, [k, n], pack_int4(qw.codes))
        self.add_raw(f"{name}_scale", elem_type, list(qw.scales.shape),
                     np.ascontiguousarray(qw.scales).tobytes())
        attrs = {"axis": 1} if qw.block is None else {"axis": 0, "block_size": qw.block}
        return self.op("DequantizeLinear", f"{name}_quantized", f"{name}_scale",
                       outputs=[name], name=f"{name}_dequantize", **attrs)

    def reduce_mean(self, x: str, axes: list[int], keepdims: int = 1) -> str:
        """ReduceMean in this graph's opset (axes became an input in opset 18)."""
        if self.opset >= 18:
            return self.op("ReduceMean", x, self.const(axes), keepdims=keepdims)
        return self.op("ReduceMean", x, axes=axes, keepdims=keepdims)

    def const(self, value, dtype=np.int64) -> str:
        """A small constant initializer, shared between uses of the same value."""
        from onnx import numpy_helper

        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
        return self._consts[key]

    def input(self, name: str, elem_type: int, shape) -> str:
        from onnx import helper

        self.inputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def output(self, source: str, name: str, elem_type: int, shape) -> str:
        from onnx import helper

        if source != name:
            self.op("Identity", source, outputs=[name], name=f"output_{name}")
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, list(shape)))
        return name

    def model(self, functions=(), doc: str = ""):
        from onnx import helper

        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  initializer=self.initializers, doc_string=doc)
        opsets = [helper.make_opsetid("", self.opset)]
        if functions:
            opsets.append(helper.make_opsetid(FEATHER_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, functions=list(functions),
                                  producer_name="feather-export")
        # ONNX Runtime >= 1.14 and TensorRT 10.x read IR 8; INT4 and opset 21 need IR 10
        model.ir_version = 8 if self.opset == OPSET else 10
        return model
