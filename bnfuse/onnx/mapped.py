"""Weights read in place from memory-mapped files, and handed back when done.

Every large weight of a model (inline in the .onnx or in external data) is a
read-only numpy view of a memory-mapped file: loading copies nothing, and the
kernel reads a page when something touches it. Touched pages count toward the
process's resident memory until they are unmapped, so whoever has finished
with a weight calls ``release`` on its tensor: MADV_DONTNEED drops those pages
from this process (they stay in the page cache, and a later read maps them
again). That keeps peak memory near one layer, not one model, however large
the model.

Such a weight is a ``bnfuse.onnx.tensors.Mapped``: its file, its offset and its
array. An unchanged one is written out with ``copy_to``: copy_file_range, a
copy inside the kernel that never passes through this process's memory.
"""

from __future__ import annotations

import mmap
import os
import weakref
from pathlib import Path

import numpy as np
import numpy.typing as npt

from bnfuse import outputs

PAGE = mmap.PAGESIZE


class MappedFile:
    """One file, mapped read-only once; arrays are views of it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)  # for copy_file_range; closed with self
        weakref.finalize(self, os.close, self._fd)
        self.size = os.fstat(self._fd).st_size
        self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ) if self.size else None

    @property
    def buffer(self) -> memoryview:
        return memoryview(self._map) if self._map is not None else memoryview(b"")

    @property
    def fileno(self) -> int:
        return self._fd

    def array(
        self, offset: int, dtype: npt.DTypeLike, shape: tuple[int, ...]
    ) -> npt.NDArray[np.generic]:
        """A read-only view of ``shape`` elements of ``dtype`` at ``offset``."""
        dt = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        if offset < 0 or offset + count * dt.itemsize > self.size:
            raise ValueError(
                f"{count * dt.itemsize} bytes at offset {offset} run past the end of "
                f"{self.path.name} ({self.size} bytes)"
            )
        if count == 0 or self._map is None:
            return np.zeros(shape, dt)
        return np.frombuffer(self._map, dt, count=count, offset=offset).reshape(shape)

    def release(self, offset: int, length: int) -> None:
        if self._map is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = offset - offset % PAGE
        self._map.madvise(mmap.MADV_DONTNEED, start, min(self.size, offset + length) - start)


def copy_to(mapped: MappedFile, offset: int, length: int, fd: int) -> None:
    """Append ``length`` bytes of ``mapped`` at ``offset`` to ``fd``, inside the kernel."""
    done = 0
    while done < length:
        try:
            n = os.copy_file_range(mapped.fileno, fd, length - done, offset + done)
        except (OSError, AttributeError):  # not between these files, or not Linux: via memory
            outputs.write_all(fd, mapped.buffer[offset + done : offset + length])
            return
        if n == 0:
            raise OSError(f"{mapped.path}: ended before {offset + length} bytes")
        done += n
