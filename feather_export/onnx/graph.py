"""A small ONNX graph builder: nodes, initializers and typed I/O, with generated unique names."""
from __future__ import annotations

import itertools

import numpy as np

OPSET = 17          # TensorRT 10.3 (JetPack 6) parses opsets up to 20; 17 has LayerNormalization
FEATHER_DOMAIN = "feather"

DTYPES = {"fp32": 1, "fp16": 10, "bf16": 16}          # onnx.TensorProto element types
_NUMPY_TYPES = {np.dtype("float32"): 1, np.dtype("float16"): 10, np.dtype("int64"): 7,
                np.dtype("int32"): 6, np.dtype("bool"): 9}


def tensor_from_torch(name: str, tensor, elem_type: int):
    """An initializer from a torch tensor, converted to ``elem_type`` (raw little-endian bytes)."""
    import torch
    from onnx import TensorProto

    torch_type = {1: torch.float32, 10: torch.float16, 16: torch.bfloat16}[elem_type]
    t = tensor.detach().to(torch_type).contiguous().cpu()
    raw = t.view(torch.int16) if elem_type == 16 else t
    proto = TensorProto(name=name, data_type=elem_type, dims=list(t.shape))
    proto.raw_data = raw.numpy().tobytes()
    return proto


class GraphBuilder:
    """Collects nodes and initializers; ``op`` returns the output name(s) of the new node."""

    def __init__(self, name: str):
        self.name = name
        self.nodes, self.initializers, self.inputs, self.outputs = [], [], [], []
        self._counter = itertools.count()
        self._consts: dict[tuple, str] = {}

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
        self.initializers.append(tensor_from_torch(name, tensor, elem_type))
        return name

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
        opsets = [helper.make_opsetid("", OPSET)]
        if functions:
            opsets.append(helper.make_opsetid(FEATHER_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, functions=list(functions),
                                  producer_name="feather-export")
        model.ir_version = 8      # ONNX Runtime >= 1.14 and TensorRT 10.x read IR 8
        return model
