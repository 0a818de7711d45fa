"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files, gzip), offline.

The whole set is 60k + 10k 28x28 bytes (about 55 MB), so it lives on the training device as
one tensor and batches are index slices: no DataLoader, no worker processes.
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# Mean and std of the training pixels in [0, 1].
MEAN, STD = 0.2860, 0.3530


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """The folder holding the four IDX files: ``path``, else $Q3R_FMNIST_DIR, else Debian's."""
    folder = Path(path or os.environ.get("Q3R_FMNIST_DIR") or DEFAULT_DIR)
    missing = [name for name in FILES.values() if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST not found in {folder} (missing {', '.join(missing)}). Install it with "
            "`apt-get install -y dataset-fashion-mnist` (files go to /usr/share/datasets/fashion-mnist/), "
            "or point --data-dir / $Q3R_FMNIST_DIR at a folder holding the four IDX .gz files."
        )
    return folder


def read_idx(path: Path) -> np.ndarray:
    """An IDX file: magic (0, 0, dtype 0x08 = uint8, ndim), ndim big-endian int32 sizes, data.

    Any damage (not gzip, cut short, wrong magic, wrong size) is a ValueError naming the file.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; a cut-short file an EOFError
        raise ValueError(f"{path} is not a readable gzip file ({type(err).__name__}: {err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {raw[:4]!r})")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: IDX header cut short ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: header says {shape}, file holds {data.size} values")
    return data.reshape(shape)


def counts(path=None) -> dict[str, int]:
    """Number of items in each file, read from the IDX headers only (cheap: no full decompression,
    so a file damaged past its header passes: :func:`check` reads everything)."""
    folder = data_dir(path)
    out = {}
    for key, name in FILES.items():
        with gzip.open(folder / name, "rb") as f:
            out[key] = int.from_bytes(f.read(8)[4:8], "big")  # magic, then the first dimension
    return out


def check(path=None) -> dict[str, int]:
    """Read and check all four files (gzip, magic, shape, size; images and labels of equal
    count) and return the number of items in each; a ValueError names a damaged file."""
    folder = data_dir(path)
    ndims = dict(train_images=3, train_labels=1, test_images=3, test_labels=1)
    out = {}
    for key, name in FILES.items():
        shape = read_idx(folder / name).shape
        if len(shape) != ndims[key] or (ndims[key] == 3 and shape[1:] != (28, 28)):
            raise ValueError(f"{folder / name}: expected {'(N, 28, 28) images' if ndims[key] == 3 else '(N,) labels'}, got shape {shape}")
        out[key] = shape[0]
    for part in ("train", "test"):
        if out[f"{part}_images"] != out[f"{part}_labels"]:
            raise ValueError(f"{folder}: {out[f'{part}_images']} {part} images but {out[f'{part}_labels']} {part} labels")
    return out


def load(path=None, device="cpu") -> dict[str, torch.Tensor]:
    """{train_images, train_labels, test_images, test_labels}; images uint8 (N, 1, 28, 28)."""
    folder = data_dir(path)
    out = {}
    for key, name in FILES.items():
        array = torch.from_numpy(read_idx(folder / name).copy())
        out[key] = (array.unsqueeze(1) if array.dim() == 3 else array.long()).to(device)
    return out


def normalize(images_uint8: torch.Tensor) -> torch.Tensor:
    return (images_uint8.float() / 255.0 - MEAN) / STD


def augment(images: torch.Tensor, generator: torch.Generator, shift: int = 2) -> torch.Tensor:
    """Random translation by up to ``shift`` pixels (zero padding) and random horizontal flip.

    Per-sample crops by two gathers on the padded batch, so it runs on the GPU in one go;
    the random draws come from a CPU generator so they do not depend on the device.
    """
    B, C, H, W = images.shape
    dev = images.device
    padded = torch.nn.functional.pad(images, (shift, shift, shift, shift))
    dy = torch.randint(0, 2 * shift + 1, (B,), generator=generator).to(dev)
    dx = torch.randint(0, 2 * shift + 1, (B,), generator=generator).to(dev)
    flip = torch.rand(B, generator=generator).lt(0.5).to(dev)
    rows = (dy[:, None] + torch.arange(H, device=dev)).view(B, 1, H, 1).expand(B, C, H, W + 2 * shift)
    cols = torch.arange(W, device=dev).expand(B, W)
    cols = (torch.where(flip[:, None], W - 1 - cols, cols) + dx[:, None]).view(B, 1, 1, W).expand(B, C, H, W)
    return padded.gather(2, rows).gather(3, cols)
