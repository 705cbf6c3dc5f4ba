"""IDX files (the MNIST / Fashion-MNIST format), gzipped or not."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from dinoflow.errors import SpecError

FASHION_MNIST_DIR = Path(os.environ.get("DINOFLOW_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX array; a truncated or foreign file is a clear error."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise SpecError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise SpecError(f"{path} is not an IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    dtype = np.dtype(_DTYPES[raw[2]])
    body = raw[4 + 4 * ndim :]
    need = int(np.prod(dims)) * dtype.itemsize
    if len(body) < need:
        raise SpecError(f"{path} is truncated: {len(body)} bytes of data, header promises {need}")
    return np.frombuffer(body[:need], dtype=dtype).reshape(dims)


def fashion_mnist_paths(root: str | os.PathLike[str] | None = None) -> dict[str, tuple[Path, Path]]:
    """split -> (images, labels) paths; a clear message when the Debian package is missing."""
    root = Path(root) if root else FASHION_MNIST_DIR
    out = {
        "train": (root / "train-images-idx3-ubyte.gz", root / "train-labels-idx1-ubyte.gz"),
        "test": (root / "t10k-images-idx3-ubyte.gz", root / "t10k-labels-idx1-ubyte.gz"),
    }
    missing = [str(p) for pair in out.values() for p in pair if not p.exists()]
    if missing:
        raise SpecError(
            f"Fashion-MNIST not found ({missing[0]} missing): `apt-get install dataset-fashion-mnist` "
            "installs it, or set DINOFLOW_FASHION_MNIST_DIR"
        )
    return out


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) straight from the IDX files."""
    imgs, labels = fashion_mnist_paths(root)[split]
    return read_idx(imgs), read_idx(labels).astype(np.int64)
