"""Fashion-MNIST: find it, fetch it, check it, hold it in memory, and serve shuffled minibatches.

The data set is the four standard IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), each either gzip-compressed (``.gz``,
preferred when both are present) or raw. A folder counts as holding the data set when it holds all four.

Lookup order:

1. the ``data_dir`` argument (``--data-dir`` on the command line);
2. ``$BNLAB_DATA``;
3. the user cache, ``bnlab.paths.cache_dir() / "fashion-mnist"`` (``$BNLAB_CACHE_DIR`` moves it);
4. ``/usr/share/datasets/fashion-mnist`` (Debian's ``dataset-fashion-mnist`` package).

An explicit folder (1 or 2) is the only place looked: if it lacks the files that is an error, or, with
downloading allowed, that is where they are downloaded to. Otherwise missing data is downloaded into the
user cache from Zalando's mirror (``$BNLAB_MIRROR`` overrides it). Every downloaded file is written to a
``.part`` file, its decompressed sha256 checked, and only then renamed into place, so an interrupted or
corrupt download never leaves a file that passes for complete.

`load` checks the IDX structure of every file (magic number, dimensions, payload length, label count)
and then its sha256, hashed from the bytes it has read anyway (about 30 ms for the whole set), so a
damaged or replaced file is never trained on; `verify` reports every file's checksum.

Example::

    from bnlab import data

    ds = data.load().subset(train=10_000, seed=0)
    for x, y in data.batches(ds.train_images, ds.train_labels, 256, shuffle=True, seed=epoch):
        ...  # x: float32 (256, 1, 28, 28) in [0, 1]; y: int64 (256,)
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import secrets
import struct
import sys
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Mapping, Optional, Union

import torch
from tqdm import tqdm

from bnlab.paths import cache_dir

__all__ = [
    "CLASSES",
    "FILES",
    "CHECKSUMS",
    "DEFAULT_MIRROR",
    "SYSTEM_DIR",
    "DataError",
    "FashionMNIST",
    "search_path",
    "locate",
    "download",
    "verify",
    "load",
    "batches",
    "num_batches",
]

PathLike = Union[str, "os.PathLike[str]"]

CLASSES: tuple[str, ...] = (
    "t-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
CHECKSUMS: dict[str, str] = {
    "train_images": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train_labels": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "test_images": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "test_labels": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
DEFAULT_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

IMAGE_SIZE = 28
_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20
_TIMEOUT = 60.0  # seconds without progress before a download gives up
_HOW_TO_GET = (
    "run `bnlab data download`, set BNLAB_DATA or --data-dir to a folder holding the four IDX files, "
    "or on Debian/Ubuntu `apt-get install dataset-fashion-mnist`"
)


class DataError(ValueError):
    """The data set is missing, damaged, or does not match what was expected."""


# ----------------------------------------------------------------------------------------------------
# Finding the files


def _explicit_dir(data_dir: Optional[PathLike]) -> Optional[Path]:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("BNLAB_DATA"):
        return Path(os.environ["BNLAB_DATA"]).expanduser()
    return None


def _cache_data_dir() -> Path:
    return cache_dir() / "fashion-mnist"


def search_path(data_dir: Optional[PathLike] = None) -> list[Path]:
    """The folders `locate` looks in, in order.

    An explicit folder (``data_dir``, else ``$BNLAB_DATA``) is the only candidate; without one, the user
    cache and then `SYSTEM_DIR`.
    """
    explicit = _explicit_dir(data_dir)
    if explicit is not None:
        return [explicit]
    return [_cache_data_dir(), SYSTEM_DIR]


def _find_file(directory: Path, key: str) -> Optional[Path]:
    name = FILES[key]
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def _missing_files(directory: Path) -> list[str]:
    return [FILES[key] for key in FILES if _find_file(directory, key) is None]


def locate(data_dir: Optional[PathLike] = None) -> Optional[Path]:
    """The first folder of `search_path` that holds all four files (gzip or raw), or None."""
    for directory in search_path(data_dir):
        if directory.is_dir() and not _missing_files(directory):
            return directory
    return None


def _not_found(data_dir: Optional[PathLike]) -> DataError:
    places = []
    for directory in search_path(data_dir):
        if not directory.is_dir():
            places.append(f"{directory} (no such folder)")
        else:
            places.append(f"{directory} (missing {', '.join(_missing_files(directory))})")
    return DataError(f"Fashion-MNIST not found; looked in {'; '.join(places)}. To get it, {_HOW_TO_GET}")


# ----------------------------------------------------------------------------------------------------
# Checking and downloading


def _repair_hint(path: Path) -> str:
    if SYSTEM_DIR in path.parents:
        return "reinstall it with `apt-get install --reinstall dataset-fashion-mnist`"
    return "delete it and run `bnlab data download` to fetch it again, or check the folder with `bnlab data verify`"


def _damaged(path: Path, problem: str) -> DataError:
    return DataError(f"{path}: {problem}; {_repair_hint(path)}")


def _is_gzip(path: Path) -> bool:
    return path.name.endswith(".gz")


# Reading a gzip file can fail three ways: a bad header (BadGzipFile), a cut-off stream (EOFError),
# or corrupt deflate data (zlib.error).
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)


def _decompressed_sha256(path: Path, gzipped: bool) -> str:
    """The sha256 of the file's content, after gunzip if ``gzipped``; raises one of _GZIP_ERRORS."""
    digest = hashlib.sha256()
    opener = gzip.open if gzipped else open
    with opener(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _resolve_checksums(checksums: Optional[Mapping[str, str]]) -> dict[str, str]:
    overrides = dict(checksums or {})
    unknown = sorted(set(overrides) - set(FILES))
    if unknown:
        raise ValueError(f"checksums has unknown keys {unknown}; expected some of {sorted(FILES)}")
    return {**CHECKSUMS, **overrides}


def verify(
    data_dir: Optional[PathLike] = None, *, checksums: Optional[Mapping[str, str]] = None
) -> list[tuple[str, Path, bool, str]]:
    """Check the decompressed sha256 of each file; one ``(key, path, ok, message)`` per file.

    The folder is the one `locate` finds, else the explicit folder (``data_dir`` or ``$BNLAB_DATA``),
    where missing files are reported as such. With no explicit folder and nothing found, DataError.
    ``checksums`` overrides some or all of `CHECKSUMS`.
    """
    expected = _resolve_checksums(checksums)
    root = locate(data_dir) or _explicit_dir(data_dir)
    if root is None:
        raise _not_found(data_dir)
    report = []
    for key, name in FILES.items():
        path = _find_file(root, key)
        if path is None:
            report.append((key, root / name, False, "missing"))
            continue
        try:
            actual = _decompressed_sha256(path, _is_gzip(path))
        except _GZIP_ERRORS as exc:
            report.append((key, path, False, f"not a readable gzip file ({exc}); {_repair_hint(path)}"))
            continue
        except OSError as exc:
            report.append((key, path, False, f"cannot read it ({exc.strerror or exc}); check its permissions"))
            continue
        if actual == expected[key]:
            report.append((key, path, True, "ok"))
        else:
            report.append((key, path, False, f"sha256 {actual}, expected {expected[key]}"))
    return report


_RETRY = "check the network or the mirror (BNLAB_MIRROR) and run `bnlab data download` again"


def _stream_to(url: str, out: BinaryIO, *, timeout: float, show_progress: bool) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            expected = int(length) if length and length.isdigit() else None
            received = 0
            with tqdm(
                total=expected, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1], disable=not show_progress
            ) as bar:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as exc:
        raise DataError(f"downloading {url} failed ({exc!r}); {_RETRY}") from exc
    # http.client returns a short body without complaint when the server closes early.
    if expected is not None and received != expected:
        raise DataError(f"downloading {url} stopped after {received} of {expected} bytes; {_RETRY}")


def _fetch(url: str, target: Path, sha256: str, *, timeout: float, show_progress: bool) -> None:
    # The random infix keeps two concurrent downloads into one folder from writing the same part file.
    part = target.with_name(f"{target.name}.{secrets.token_hex(4)}.part")
    try:
        with open(part, "xb") as out:
            _stream_to(url, out, timeout=timeout, show_progress=show_progress)
        try:
            actual = _decompressed_sha256(part, gzipped=True)
        except _GZIP_ERRORS as exc:
            raise DataError(f"downloaded {url} is not a readable gzip file ({exc}); {_RETRY}") from exc
        if actual != sha256:
            raise DataError(
                f"downloaded {url} decompresses to sha256 {actual}, expected {sha256}; the mirror serves a "
                "different file: try another mirror (BNLAB_MIRROR) or get the data another way"
            )
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)


def _is_verified(path: Optional[Path], sha256: str) -> bool:
    if path is None:
        return False
    try:
        return _decompressed_sha256(path, _is_gzip(path)) == sha256
    except _GZIP_ERRORS:
        return False


def _download_to(
    root: Path,
    *,
    mirror: Optional[str],
    checksums: Optional[Mapping[str, str]],
    progress: Optional[bool],
    timeout: float,
) -> Path:
    expected = _resolve_checksums(checksums)
    base = (mirror or os.environ.get("BNLAB_MIRROR") or DEFAULT_MIRROR).rstrip("/")
    show_progress = sys.stderr.isatty() if progress is None else progress
    root.mkdir(parents=True, exist_ok=True)
    for key, name in FILES.items():
        if _is_verified(_find_file(root, key), expected[key]):
            continue
        # The .gz is preferred by lookup, so a fresh download replaces a damaged file of either kind.
        _fetch(f"{base}/{name}.gz", root / f"{name}.gz", expected[key], timeout=timeout, show_progress=show_progress)
    return root


def download(
    dest: Optional[PathLike] = None,
    *,
    mirror: Optional[str] = None,
    checksums: Optional[Mapping[str, str]] = None,
    progress: Optional[bool] = None,
    timeout: float = _TIMEOUT,
) -> Path:
    """Download the four files into ``dest`` and return that folder.

    ``dest`` defaults to ``$BNLAB_DATA``, else the user cache. Files already there whose decompressed
    sha256 matches are kept; others are fetched from ``mirror`` (default ``$BNLAB_MIRROR``, else
    `DEFAULT_MIRROR`) as ``<name>.gz``. ``checksums`` overrides some or all of `CHECKSUMS`. The progress
    bar shows when ``progress`` is true, or when it is None and stderr is a terminal. ``timeout`` (seconds)
    bounds each network wait. Any failure raises DataError and leaves no partial file under a final name.
    """
    root = _explicit_dir(dest) or _cache_data_dir()
    return _download_to(root, mirror=mirror, checksums=checksums, progress=progress, timeout=timeout)


# ----------------------------------------------------------------------------------------------------
# Parsing


def _read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path} ({exc.strerror or exc}); check its permissions") from None
    if not _is_gzip(path):
        return raw
    try:
        return gzip.decompress(raw)
    except _GZIP_ERRORS as exc:
        raise _damaged(path, f"not a readable gzip file ({exc})") from exc


def _read_idx(path: Path, magic: int) -> tuple[torch.Tensor, str]:
    """The IDX file's array and the sha256 of its (decompressed) bytes; DataError naming the file if its
    structure is wrong."""
    data = _read_bytes(path)
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise _damaged(path, f"{len(data)} bytes, too short for an IDX header of {header} bytes")
    (found,) = struct.unpack_from(">I", data)
    if found != magic:
        hint = " (it is gzip-compressed: name it .gz)" if data[:2] == _GZIP_MAGIC else ""
        raise _damaged(path, f"IDX magic number 0x{found:08x}, expected 0x{magic:08x}{hint}")
    dims = struct.unpack_from(f">{ndim}I", data, 4)
    size = 1
    for dim in dims:
        size *= dim
    if len(data) - header != size:
        raise _damaged(path, f"payload of {len(data) - header} bytes, expected {size} for dimensions {dims}")
    # bytearray: torch must own writable memory rather than alias the immutable bytes object.
    array = torch.frombuffer(bytearray(memoryview(data)[header:]), dtype=torch.uint8).reshape(dims)
    return array, hashlib.sha256(data).hexdigest()


def _check_sha256(path: Path, actual: str, expected: str) -> None:
    if actual != expected:
        raise _damaged(path, f"content has sha256 {actual}, expected {expected}: the file is damaged, or it is "
                             "not the Fashion-MNIST file of that name")


def _load_split(root: Path, split: str, checksums: Mapping[str, str]) -> tuple[torch.Tensor, torch.Tensor]:
    images_path = _find_file(root, f"{split}_images")
    labels_path = _find_file(root, f"{split}_labels")
    if images_path is None or labels_path is None:
        raise DataError(f"{root} lacks the {split} files; {_HOW_TO_GET}")
    images, images_sha256 = _read_idx(images_path, _IMAGES_MAGIC)
    if tuple(images.shape[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        found = "x".join(map(str, images.shape[1:]))
        raise _damaged(images_path, f"images of {found} pixels, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    labels, labels_sha256 = _read_idx(labels_path, _LABELS_MAGIC)
    if len(labels) != len(images):
        raise _damaged(labels_path, f"{len(labels)} labels for the {len(images)} images of {images_path}")
    if len(labels) and int(labels.max()) >= len(CLASSES):
        raise _damaged(labels_path, f"label {int(labels.max())}, expected 0..{len(CLASSES) - 1}")
    _check_sha256(images_path, images_sha256, checksums[f"{split}_images"])
    _check_sha256(labels_path, labels_sha256, checksums[f"{split}_labels"])
    return images, labels.long()


def _random_rows(n: int, size: Optional[int], seed: int, what: str) -> Optional[torch.Tensor]:
    if size is None:
        return None
    if not 1 <= size <= n:
        raise DataError(f"a {what} subset of {size} samples was asked for, but 1..{n} are available")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


@dataclass(frozen=True, eq=False)
class FashionMNIST:
    """The whole data set in memory: uint8 images (N, 28, 28) and int64 labels (N,) per split."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    root: Path
    classes: tuple[str, ...] = CLASSES

    def subset(self, train: Optional[int] = None, test: Optional[int] = None, seed: int = 0) -> FashionMNIST:
        """A seeded random subset of ``train`` training and ``test`` test samples (None keeps a split whole).

        The rows are drawn uniformly, so class balance holds up to sampling noise.
        """
        train_rows = _random_rows(len(self.train_labels), train, seed, "training")
        test_rows = _random_rows(len(self.test_labels), test, seed, "test")
        return FashionMNIST(
            train_images=self.train_images if train_rows is None else self.train_images[train_rows],
            train_labels=self.train_labels if train_rows is None else self.train_labels[train_rows],
            test_images=self.test_images if test_rows is None else self.test_images[test_rows],
            test_labels=self.test_labels if test_rows is None else self.test_labels[test_rows],
            root=self.root,
            classes=self.classes,
        )

    def __repr__(self) -> str:
        return f"FashionMNIST(train={len(self.train_labels)}, test={len(self.test_labels)}, root={str(self.root)!r})"


def load(
    data_dir: Optional[PathLike] = None,
    *,
    download: bool = True,
    mirror: Optional[str] = None,
    checksums: Optional[Mapping[str, str]] = None,
    progress: Optional[bool] = None,
) -> FashionMNIST:
    """Find (or, with ``download``, fetch) the data set and read it into memory.

    Lookup follows `search_path`. When nothing is found and ``download`` is true the files are fetched
    as by `download` into the explicit folder or the user cache; otherwise DataError lists where it looked
    and how to get the data. The IDX structure and the sha256 of every file are checked (``checksums``
    overrides some or all of `CHECKSUMS`); DataError names a damaged file and how to repair it, except in
    bnlab's own download cache, whose damaged files are downloaded again (with ``download``) after a notice.
    """
    expected = _resolve_checksums(checksums)
    root = locate(data_dir)
    if root is None:
        if not download:
            raise _not_found(data_dir)
        target = _explicit_dir(data_dir) or _cache_data_dir()
        root = _download_to(target, mirror=mirror, checksums=checksums, progress=progress, timeout=_TIMEOUT)
    try:
        return _read(root, expected)
    except DataError as exc:
        # bnlab's own download cache is rebuilt, not trusted; the user's and the system's folders are theirs.
        if not download or root != _cache_data_dir():
            raise
        print(f"bnlab: notice: {exc}; downloading it again", file=sys.stderr)
        _download_to(root, mirror=mirror, checksums=checksums, progress=progress, timeout=_TIMEOUT)
        return _read(root, expected)


def _read(root: Path, checksums: Mapping[str, str]) -> FashionMNIST:
    train_images, train_labels = _load_split(root, "train", checksums)
    test_images, test_labels = _load_split(root, "test", checksums)
    return FashionMNIST(train_images, train_labels, test_images, test_labels, root=root)


# ----------------------------------------------------------------------------------------------------
# Minibatches


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, H, W) as the networks take them: float32 (N, 1, H, W) in [0, 1].

    Example:
        >>> to_input(torch.full((2, 28, 28), 255, dtype=torch.uint8)).shape
        torch.Size([2, 1, 28, 28])
    """
    return images.float().div_(255).unsqueeze_(1)


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches `batches` yields for ``n`` samples."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return n // batch_size if drop_last else -(-n // batch_size)


def batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    drop_last: bool = False,
    device: Union[str, torch.device] = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(x, y)`` minibatches: x float32 (B, 1, H, W) in [0, 1], y int64 (B,), on ``device``.

    ``images`` is uint8 (N, H, W). With ``shuffle`` the order is
    ``torch.randperm(N, generator=torch.Generator().manual_seed(seed))``, so a seed fixes it; pass a
    different seed each epoch for a fresh order. Only each batch is converted to float, after the move to
    ``device`` (a quarter of the bytes to copy). Arguments are checked here, not at the first batch.
    """
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(f"images must be uint8 (N, H, W), got {images.dtype} {tuple(images.shape)}")
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    count = num_batches(len(images), batch_size, drop_last)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed)) if shuffle else None
    return _iterate(images, labels, batch_size, count, order, torch.device(device))


def _iterate(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    count: int,
    order: Optional[torch.Tensor],
    device: torch.device,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for start in range(0, count * batch_size, batch_size):
        if order is None:
            x, y = images[start : start + batch_size], labels[start : start + batch_size]
        else:
            # index_select copies whole rows; advanced indexing (images[rows]) is ~10x slower on CPU.
            rows = order[start : start + batch_size]
            x, y = images.index_select(0, rows), labels.index_select(0, rows)
        yield to_input(x.to(device)), y.to(device)
