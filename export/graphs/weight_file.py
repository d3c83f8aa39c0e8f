"""Initializers streamed to, and read back from, an ONNX external data file one tensor at a time.

Large graphs keep their weights in `<graph>.onnx.data`. Writing each tensor there as soon as it is made, and
reading an existing one alone when it is needed, lets the exporter build or rewrite a graph of any size while
holding at most one weight (and its converted form): never a second full copy of the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
from onnx import TensorProto, helper, numpy_helper

# Tensors smaller than this stay inline in the graph (shapes, scalars, norms of tiny models).
INLINE_BYTES = 1024
# Each external tensor starts on a page, so onnxruntime can map it in place.
ALIGNMENT = 4096


class WeightWriter:
    """Makes initializers: with a `data` file, tensors of `INLINE_BYTES` or more are appended to it (the graph
    records `location`, offset and length); without one, or when small, they are inline."""

    def __init__(self, data: BinaryIO | None = None, location: str = ""):
        self.data, self.location = data, location

    def tensor(self, name: str, array: np.ndarray) -> TensorProto:
        array = np.asarray(array, order="C")  # (keeps a scalar's shape, which ascontiguousarray makes [1])
        if self.data is None or array.nbytes < INLINE_BYTES:
            return numpy_helper.from_array(array, name)
        offset = self.data.tell()
        padding = -offset % ALIGNMENT
        self.data.write(b"\0" * padding)
        self.data.write(memoryview(array).cast("B"))
        tensor = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype), dims=array.shape)
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", str(offset + padding)), ("length", str(array.nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        return tensor


def read_tensor(tensor: TensorProto, folder: Path) -> np.ndarray:
    """An initializer's values; an external one is read from its file in `folder`, that tensor alone."""
    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    fields = {entry.key: entry.value for entry in tensor.external_data}
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    shape = tuple(tensor.dims)
    count = int(np.prod(shape, dtype=np.int64))
    # Read, not memory-mapped: a mapped page stays in the process' resident memory once touched, so mapping
    # every weight of a large graph in turn would make the process as large as the file.
    values = np.fromfile(folder / fields["location"], dtype=dtype, count=count, offset=int(fields.get("offset", 0)))
    if values.size != count:
        raise OSError(f"{fields['location']} is shorter than the graph says: tensor {tensor.name} is cut off")
    return values.reshape(shape)
