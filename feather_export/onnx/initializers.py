"""Initializers streamed into a segment's external-data file as its graph is built.

``GraphBuilder(..., store=InitializerStore(path))`` hands every weight's bytes to the store, which
appends them to ``<segment>.onnx.data`` and returns a ``TensorProto`` that only points there
(ONNX's external-data fields: location, offset, length). The graph proto therefore never holds
weights, and the exporter holds one converted tensor at a time. The file's SHA-256 is computed as
it is written.

Tensors under 1 KiB stay inline and tensors of 1 MiB or more start on a 4 KiB boundary, as
``onnx.save_model(..., save_as_external_data=True)`` lays them out. ``inline_into`` moves the
data of a small segment back into its graph so small artifacts stay one file per segment.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

INLINE_BYTES = 1024          # smaller tensors stay in the graph (onnx's default size_threshold)
ALIGN, ALIGN_FROM = 4096, 1 << 20


class InitializerStore:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "wb")
        self._sha = hashlib.sha256()
        self.offset = 0                 # bytes written so far (padding included)
        self.tensor_bytes = 0           # bytes of tensor data so far

    def add(self, name: str, elem_type: int, dims: list[int], raw):
        """``raw``: bytes or a flat uint8 array (written without another copy)."""
        from onnx import TensorProto

        proto = TensorProto(name=name, data_type=elem_type, dims=dims)
        if len(raw) < INLINE_BYTES:
            proto.raw_data = bytes(raw)
            return proto
        if len(raw) >= ALIGN_FROM and self.offset % ALIGN:
            self._write(b"\0" * (ALIGN - self.offset % ALIGN))
        proto.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(self.offset)),
                           ("length", str(len(raw)))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, value
        self._write(raw)
        self.tensor_bytes += len(raw)
        return proto

    def _write(self, data: bytes) -> None:
        self._file.write(data)
        self._sha.update(data)
        self.offset += len(data)

    def close(self) -> str:
        """Flush and close the file; returns its SHA-256 (hex)."""
        if not self._file.closed:
            self._file.close()
        return self._sha.hexdigest()

    def inline_into(self, model) -> None:
        """Move every external tensor of ``model`` back into the graph and delete the file (for
        segments small enough to be one file)."""
        from onnx import TensorProto

        self.close()
        data = self.path.read_bytes()
        for tensor in model.graph.initializer:
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            offset, length = int(info["offset"]), int(info["length"])
            tensor.raw_data = data[offset:offset + length]
            del tensor.external_data[:]
            tensor.data_location = TensorProto.DEFAULT
        self.path.unlink()
