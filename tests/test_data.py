"""bnlab.data: IDX parsing and its errors, lookup order, downloads against a loopback mirror, minibatches,
and the real Fashion-MNIST from Debian's dataset-fashion-mnist package."""

from __future__ import annotations

import gzip
import hashlib
import struct
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bnlab import data

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_SYSTEM_DIR = data.SYSTEM_DIR  # captured before the autouse fixture patches it
N_TRAIN, N_TEST = 20, 10


# ----------------------------------------------------------------------------------------------------
# Small generated data sets


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file of unsigned bytes, written independently of the parser under test."""
    magic = 0x800 | array.ndim if magic is None else magic
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes()


@dataclass
class Generated:
    arrays: dict[str, np.ndarray]
    contents: dict[str, bytes]  # decompressed file contents

    @property
    def checksums(self) -> dict[str, str]:
        return {key: hashlib.sha256(content).hexdigest() for key, content in self.contents.items()}

    def gz(self, key: str) -> bytes:
        return gzip.compress(self.contents[key], mtime=0)


def generate(seed: int = 0) -> Generated:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }
    return Generated(arrays, {key: idx_bytes(array) for key, array in arrays.items()})


def write(directory: Path, generated: Generated, compression: str = "gz") -> Path:
    """Write the four files; compression is "gz", "raw" or "mixed" (images gz, labels raw)."""
    directory.mkdir(parents=True, exist_ok=True)
    for key, name in data.FILES.items():
        gz = compression == "gz" or (compression == "mixed" and key.endswith("images"))
        if gz:
            (directory / f"{name}.gz").write_bytes(generated.gz(key))
        else:
            (directory / name).write_bytes(generated.contents[key])
    return directory


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No test sees the user's environment, cache or the real system folder unless it asks."""
    monkeypatch.delenv("BNLAB_DATA", raising=False)
    monkeypatch.delenv("BNLAB_MIRROR", raising=False)
    monkeypatch.setenv("BNLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_DIR", tmp_path / "system")


@pytest.fixture
def generated() -> Generated:
    return generate()


# ----------------------------------------------------------------------------------------------------
# Parsing


@pytest.mark.parametrize("compression", ["gz", "raw", "mixed"])
def test_load_reads_gzip_and_raw_files(tmp_path, generated, compression):
    root = write(tmp_path / "ds", generated, compression)
    ds = data.load(root, download=False, checksums=generated.checksums)
    assert ds.root == root
    assert ds.classes == data.CLASSES
    for key, array in generated.arrays.items():
        tensor = getattr(ds, key)
        expected_dtype = torch.uint8 if key.endswith("images") else torch.int64
        assert tensor.dtype == expected_dtype, key
        assert torch.equal(tensor, torch.from_numpy(array).to(expected_dtype)), key
    assert ds.train_images.shape == (N_TRAIN, 28, 28)
    assert ds.test_labels.shape == (N_TEST,)


def test_loaded_tensors_own_writable_memory(tmp_path, generated):
    ds = data.load(write(tmp_path / "ds", generated), download=False, checksums=generated.checksums)
    ds.train_images[0, 0, 0] = 7  # would warn or crash if it aliased an immutable bytes object
    assert int(ds.train_images[0, 0, 0]) == 7


def _truncate(generated: Generated):
    return "train_images", generated.contents["train_images"][:-100], "payload of"


def _trailing(generated: Generated):
    return "test_images", generated.contents["test_images"] + b"\0", "payload of"


def _bad_magic(generated: Generated):
    return "train_labels", struct.pack(">I", 0x12345678) + generated.contents["train_labels"][4:], "magic number"


def _images_magic_on_labels(generated: Generated):
    return "test_labels", idx_bytes(generated.arrays["test_labels"], magic=0x803), "magic number"


def _wrong_dims(generated: Generated):
    return "train_images", idx_bytes(generated.arrays["train_images"][:, :, :27]), "27 pixels, expected 28x28"


def _count_mismatch(generated: Generated):
    return "train_labels", idx_bytes(generated.arrays["train_labels"][:-1]), f"{N_TRAIN - 1} labels"


def _label_out_of_range(generated: Generated):
    labels = generated.arrays["test_labels"].copy()
    labels[3] = 10
    return "test_labels", idx_bytes(labels), "label 10"


def _header_only(generated: Generated):
    return "test_images", generated.contents["test_images"][:6], "too short"


DAMAGE = [
    _truncate,
    _trailing,
    _bad_magic,
    _images_magic_on_labels,
    _wrong_dims,
    _count_mismatch,
    _label_out_of_range,
    _header_only,
]


@pytest.mark.parametrize("compression", ["gz", "raw"])
@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_damaged_file_is_a_one_line_data_error_naming_it(tmp_path, generated, damage, compression):
    key, content, problem = damage(generated)
    generated.contents[key] = content
    root = write(tmp_path / "ds", generated, compression)
    with pytest.raises(data.DataError) as excinfo:
        data.load(root, download=False, checksums=generated.checksums)
    message = str(excinfo.value)
    assert data.FILES[key] in message
    assert problem in message
    assert "bnlab data download" in message and "bnlab data verify" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (lambda gz: gz[: len(gz) // 2], "end-of-stream"),  # cut-off gzip stream
        (lambda gz: b"PK\x03\x04" + gz[4:], "Not a gzipped file"),
        (lambda gz: gz[:-8] + bytes(8), "CRC"),  # damaged trailer
    ],
    ids=["truncated", "not-gzip", "bad-crc"],
)
def test_corrupt_gzip_is_a_data_error_naming_the_file(tmp_path, generated, corrupt, problem):
    root = write(tmp_path / "ds", generated)
    path = root / "train-images-idx3-ubyte.gz"
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(data.DataError, match="not a readable gzip file") as excinfo:
        data.load(root, download=False, checksums=generated.checksums)
    assert str(path) in str(excinfo.value)
    assert problem in str(excinfo.value)


def test_raw_name_holding_gzip_says_so(tmp_path, generated):
    root = write(tmp_path / "ds", generated, "raw")
    (root / "t10k-labels-idx1-ubyte").write_bytes(generated.gz("test_labels"))
    with pytest.raises(data.DataError, match=r"t10k-labels-idx1-ubyte: .*it is gzip-compressed: name it \.gz"):
        data.load(root, download=False, checksums=generated.checksums)


def test_gzip_file_is_preferred_over_raw(tmp_path, generated):
    root = write(tmp_path / "ds", generated, "gz")
    (root / "train-labels-idx1-ubyte").write_bytes(b"garbage that would fail to parse")
    ds = data.load(root, download=False, checksums=generated.checksums)
    assert torch.equal(ds.train_labels, torch.from_numpy(generated.arrays["train_labels"]).long())


# ----------------------------------------------------------------------------------------------------
# Lookup order


def test_default_system_dir_is_debians():
    assert DEFAULT_SYSTEM_DIR == REAL_DIR


def test_cache_candidate_follows_bnlab_cache_dir(tmp_path):
    assert data.search_path() == [tmp_path / "cache" / "fashion-mnist", tmp_path / "system"]


def test_lookup_order_data_dir_then_env_then_cache_then_system(tmp_path, monkeypatch, generated):
    explicit, env, cache, system = (tmp_path / n for n in ("explicit", "env", "cache/fashion-mnist", "system"))
    for directory in (explicit, env, cache, system):
        write(directory, generated)
    monkeypatch.setenv("BNLAB_DATA", str(env))

    assert data.search_path(explicit) == [explicit]
    assert data.locate(explicit) == explicit
    assert data.locate(str(explicit)) == explicit
    assert data.search_path() == [env]
    assert data.locate() == env

    monkeypatch.delenv("BNLAB_DATA")
    assert data.locate() == cache
    (cache / "t10k-labels-idx1-ubyte.gz").unlink()  # three of four files do not count
    assert data.locate() == system
    for path in system.iterdir():
        path.unlink()
    assert data.locate() is None


def test_env_data_dir_beats_cache_and_is_not_a_fallback(tmp_path, monkeypatch, generated):
    write(tmp_path / "cache" / "fashion-mnist", generated)
    monkeypatch.setenv("BNLAB_DATA", str(tmp_path / "empty"))
    assert data.locate() is None
    with pytest.raises(data.DataError) as excinfo:
        data.load(download=False)
    assert f"{tmp_path / 'empty'} (no such folder)" in str(excinfo.value)
    assert str(tmp_path / "cache") not in str(excinfo.value)


def test_explicit_dir_without_files_is_an_error_even_when_others_hold_them(tmp_path, generated):
    write(tmp_path / "system", generated)
    write(tmp_path / "cache" / "fashion-mnist", generated)
    partial = write(tmp_path / "partial", generated)
    (partial / "train-images-idx3-ubyte.gz").unlink()
    assert data.locate(partial) is None
    with pytest.raises(data.DataError) as excinfo:
        data.load(partial, download=False, checksums=generated.checksums)
    message = str(excinfo.value)
    assert f"{partial} (missing train-images-idx3-ubyte)" in message
    assert str(tmp_path / "system") not in message


def test_missing_everywhere_lists_every_place_and_how_to_get_it(tmp_path):
    (tmp_path / "system").mkdir()
    with pytest.raises(data.DataError) as excinfo:
        data.load(download=False)
    message = str(excinfo.value)
    assert f"{tmp_path / 'cache' / 'fashion-mnist'} (no such folder)" in message
    assert f"{tmp_path / 'system'} (missing train-images-idx3-ubyte, train-labels-idx1-ubyte" in message
    for remedy in ("bnlab data download", "BNLAB_DATA", "--data-dir", "apt-get install dataset-fashion-mnist"):
        assert remedy in message
    assert "\n" not in message


# ----------------------------------------------------------------------------------------------------
# Downloading from a loopback mirror


@dataclass
class Mirror:
    url: str = ""
    files: dict[str, bytes] = field(default_factory=dict)  # URL path without the leading "/" -> body
    mode: str = "ok"  # "ok", "truncate" (half the body, then close) or "stall" (half, then wait)
    requests: list[str] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)

    def serve(self, generated: Generated) -> None:
        self.files = {f"{data.FILES[key]}.gz": generated.gz(key) for key in data.FILES}


@pytest.fixture
def mirror():
    state = Mirror()

    class Handler(BaseHTTPRequestHandler):
        timeout = 5  # a client that never sends its request cannot hold the handler for long

        def do_GET(self):
            state.requests.append(self.path)
            body = state.files.get(self.path.lstrip("/"))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if state.mode == "ok":
                self.wfile.write(body)
                return
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if state.mode == "stall":
                state.release.wait(timeout=5)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        yield state
    finally:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


def test_download_fetches_verifies_and_loads(tmp_path, mirror, generated):
    mirror.serve(generated)
    root = data.download(mirror=mirror.url, checksums=generated.checksums, progress=False, timeout=5)
    assert root == tmp_path / "cache" / "fashion-mnist"
    assert leftovers(root) == sorted(f"{name}.gz" for name in data.FILES.values())
    assert sorted(mirror.requests) == sorted(f"/{name}.gz" for name in data.FILES.values())
    assert [ok for *_, ok, _ in data.verify(checksums=generated.checksums)] == [True] * 4
    ds = data.load(download=False, checksums=generated.checksums)
    assert ds.root == root
    assert torch.equal(ds.test_images, torch.from_numpy(generated.arrays["test_images"]))


def test_download_skips_verified_files_and_replaces_damaged_ones(tmp_path, mirror, generated):
    mirror.serve(generated)
    root = data.download(mirror=mirror.url, checksums=generated.checksums, progress=False, timeout=5)
    mirror.requests.clear()
    data.download(mirror=mirror.url, checksums=generated.checksums, progress=False, timeout=5)
    assert mirror.requests == []

    (root / "train-labels-idx1-ubyte.gz").write_bytes(b"damaged")
    data.download(mirror=mirror.url, checksums=generated.checksums, progress=False, timeout=5)
    assert mirror.requests == ["/train-labels-idx1-ubyte.gz"]
    assert (root / "train-labels-idx1-ubyte.gz").read_bytes() == generated.gz("train_labels")


def test_load_downloads_into_explicit_dir_from_env_mirror(tmp_path, monkeypatch, mirror, generated):
    mirror.serve(generated)
    monkeypatch.setenv("BNLAB_MIRROR", mirror.url.rstrip("/"))  # with or without the trailing slash
    target = tmp_path / "explicit" / "nested"
    ds = data.load(target, checksums=generated.checksums, progress=False)
    assert ds.root == target
    assert torch.equal(ds.train_labels, torch.from_numpy(generated.arrays["train_labels"]).long())
    assert not (tmp_path / "cache").exists()


def test_damaged_file_in_the_download_cache_is_fetched_again_with_a_notice(tmp_path, mirror, generated, capsys):
    mirror.serve(generated)
    root = data.download(mirror=mirror.url, checksums=generated.checksums, progress=False, timeout=5)
    damaged = root / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(damaged.read_bytes()))
    raw[-1] = (raw[-1] + 1) % 10  # one label changed: a well-formed file that only the checksum catches
    damaged.write_bytes(gzip.compress(bytes(raw)))
    ds = data.load(mirror=mirror.url, checksums=generated.checksums, progress=False)
    assert "notice:" in capsys.readouterr().err and damaged.name in mirror.requests[-1]
    assert torch.equal(ds.test_labels, torch.from_numpy(generated.arrays["test_labels"]).long())
    with pytest.raises(data.DataError, match="sha256"):  # without downloading, the damage is an error
        damaged.write_bytes(gzip.compress(bytes(raw)))
        data.load(download=False, checksums=generated.checksums)


def test_checksum_mismatch_leaves_no_file(tmp_path, mirror, generated):
    mirror.serve(generated)
    wrong = {**generated.checksums, "train_images": "0" * 64}
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte\.gz decompresses to sha256 [0-9a-f]{64}, expected 0{64}"):
        data.download(tmp_path / "ds", mirror=mirror.url, checksums=wrong, progress=False, timeout=5)
    assert leftovers(tmp_path / "ds") == []  # train images come first: nothing was kept


def test_checksum_mismatch_against_default_checksums(tmp_path, mirror, generated):
    mirror.serve(generated)  # small generated files can never match the real data set's checksums
    with pytest.raises(data.DataError, match=data.CHECKSUMS["train_images"]):
        data.download(tmp_path / "ds", mirror=mirror.url, progress=False, timeout=5)
    assert leftovers(tmp_path / "ds") == []


def test_interrupted_transfer_leaves_no_file_and_a_retry_succeeds(tmp_path, mirror, generated):
    mirror.serve(generated)
    mirror.mode = "truncate"
    with pytest.raises(data.DataError, match=r"train-images-idx3-ubyte\.gz stopped after \d+ of \d+ bytes"):
        data.download(tmp_path / "ds", mirror=mirror.url, checksums=generated.checksums, progress=False, timeout=5)
    assert leftovers(tmp_path / "ds") == []

    mirror.mode = "ok"
    root = data.download(tmp_path / "ds", mirror=mirror.url, checksums=generated.checksums, progress=False, timeout=5)
    assert all(ok for *_, ok, _ in data.verify(root, checksums=generated.checksums))


def test_stalled_transfer_times_out_and_leaves_no_file(tmp_path, mirror, generated):
    mirror.serve(generated)
    mirror.mode = "stall"
    # The stalled mirror closes the connection after 5 s; without the timeout that would be "stopped
    # after", so "timed out" alone shows the timeout fired first (no clock needed).
    with pytest.raises(data.DataError, match="timed out"):
        data.download(tmp_path / "ds", mirror=mirror.url, checksums=generated.checksums, progress=False, timeout=0.3)
    assert leftovers(tmp_path / "ds") == []


def test_missing_file_on_mirror_is_a_data_error(tmp_path, mirror, generated):
    mirror.serve(generated)
    del mirror.files["t10k-images-idx3-ubyte.gz"]
    with pytest.raises(data.DataError, match=r"t10k-images-idx3-ubyte\.gz failed .*404"):
        data.download(tmp_path / "ds", mirror=mirror.url, checksums=generated.checksums, progress=False, timeout=5)
    assert "t10k-images-idx3-ubyte.gz" not in leftovers(tmp_path / "ds")
    assert not any(name.endswith(".part") for name in leftovers(tmp_path / "ds"))


def test_mirror_serving_non_gzip_is_a_data_error(tmp_path, mirror, generated):
    mirror.serve(generated)
    mirror.files["train-images-idx3-ubyte.gz"] = generated.contents["train_images"]
    with pytest.raises(data.DataError, match=r"downloaded .*train-images-idx3-ubyte\.gz is not a readable gzip file"):
        data.download(tmp_path / "ds", mirror=mirror.url, checksums=generated.checksums, progress=False, timeout=5)
    assert leftovers(tmp_path / "ds") == []


@pytest.mark.parametrize("progress", [True, False])
def test_progress_bar_only_when_asked(tmp_path, mirror, generated, capsys, progress):
    mirror.serve(generated)
    data.download(tmp_path / "ds", mirror=mirror.url, checksums=generated.checksums, progress=progress, timeout=5)
    shown = "train-images-idx3-ubyte.gz" in capsys.readouterr().err
    assert shown == progress


def test_unknown_checksum_key_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown keys"):
        data.download(tmp_path / "ds", checksums={"train_image": "0" * 64}, mirror="http://127.0.0.1:9/")


# ----------------------------------------------------------------------------------------------------
# verify


def test_verify_reports_each_file(tmp_path, generated):
    root = write(tmp_path / "ds", generated)
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    (root / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    sums = {**generated.checksums, "test_images": "f" * 64}
    report = {key: (path, ok, message) for key, path, ok, message in data.verify(root, checksums=sums)}
    assert list(report) == list(data.FILES)
    assert report["train_images"] == (root / "train-images-idx3-ubyte.gz", True, "ok")
    assert report["train_labels"][1] is False and "not a readable gzip file" in report["train_labels"][2]
    assert report["test_images"][1] is False and "expected " + "f" * 64 in report["test_images"][2]
    assert report["test_labels"] == (root / "t10k-labels-idx1-ubyte", False, "missing")


def test_verify_with_nothing_found_says_where_it_looked(tmp_path):
    with pytest.raises(data.DataError, match="looked in"):
        data.verify()


# ----------------------------------------------------------------------------------------------------
# Subsets


def test_subset_is_seeded_and_keeps_pairs(tmp_path, generated):
    ds = data.load(write(tmp_path / "ds", generated), download=False, checksums=generated.checksums)
    sub = ds.subset(train=8, test=3, seed=5)
    assert sub.train_images.shape == (8, 28, 28) and sub.test_labels.shape == (3,)
    rows = torch.randperm(N_TRAIN, generator=torch.Generator().manual_seed(5))[:8]
    assert torch.equal(sub.train_images, ds.train_images[rows])
    assert torch.equal(sub.train_labels, ds.train_labels[rows])
    again = ds.subset(train=8, test=3, seed=5)
    assert torch.equal(again.train_images, sub.train_images) and torch.equal(again.test_labels, sub.test_labels)
    other = ds.subset(train=8, seed=6)
    assert not torch.equal(other.train_images, sub.train_images)
    assert other.test_images is ds.test_images  # None keeps the split whole
    assert sub.root == ds.root and sub.classes == ds.classes


@pytest.mark.parametrize("size", [N_TRAIN + 1, 0, -1])
def test_subset_size_out_of_range_is_a_data_error(tmp_path, generated, size):
    ds = data.load(write(tmp_path / "ds", generated), download=False, checksums=generated.checksums)
    with pytest.raises(data.DataError, match=f"1..{N_TRAIN} are available"):
        ds.subset(train=size)


# ----------------------------------------------------------------------------------------------------
# Minibatches


def numbered(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose every pixel is their index (mod 256), labels equal to the index: order is visible."""
    images = (torch.arange(n) % 256).to(torch.uint8).view(n, 1, 1).expand(n, 28, 28).contiguous()
    return images, torch.arange(n)


def test_batches_shapes_dtypes_and_range():
    images, labels = numbered(10)
    images[0] = 0
    images[1] = 255
    out = list(data.batches(images, labels, 4, shuffle=False))
    assert [len(y) for _, y in out] == [4, 4, 2]
    for x, y in out:
        assert x.dtype == torch.float32 and x.shape == (len(y), 1, 28, 28)
        assert y.dtype == torch.int64
    x0 = out[0][0]
    assert x0[0].max() == 0.0 and x0[1].min() == 1.0
    restored = torch.cat([x for x, _ in out]).mul(255).round().to(torch.uint8).squeeze(1)
    assert torch.equal(restored, images)
    assert torch.equal(torch.cat([y for _, y in out]), labels)


def test_shuffled_order_is_the_seeded_randperm():
    images, labels = numbered(50)
    order = torch.cat([y for _, y in data.batches(images, labels, 7, shuffle=True, seed=3)])
    assert torch.equal(order, torch.randperm(50, generator=torch.Generator().manual_seed(3)))
    same = torch.cat([y for _, y in data.batches(images, labels, 7, shuffle=True, seed=3)])
    assert torch.equal(order, same)
    different = torch.cat([y for _, y in data.batches(images, labels, 7, shuffle=True, seed=4)])
    assert not torch.equal(order, different)
    assert not torch.equal(order, labels)


def test_shuffled_batches_keep_images_with_their_labels():
    images, labels = numbered(300)
    for x, y in data.batches(images, labels, 32, shuffle=True, seed=1):
        assert torch.equal(x[:, 0, 0, 0].mul(255).round().long(), y % 256)


def test_drop_last():
    images, labels = numbered(10)
    out = list(data.batches(images, labels, 4, shuffle=True, drop_last=True))
    assert [len(y) for _, y in out] == [4, 4]
    assert len(torch.cat([y for _, y in out]).unique()) == 8
    assert data.num_batches(10, 4, drop_last=True) == 2
    assert data.num_batches(10, 4) == 3
    assert data.num_batches(8, 4) == 2


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 60), batch_size=st.integers(1, 25), drop_last=st.booleans(), seed=st.integers(0, 2**31))
def test_every_sample_exactly_once_per_epoch(n, batch_size, drop_last, seed):
    images, labels = numbered(n)
    out = [y for _, y in data.batches(images, labels, batch_size, shuffle=True, seed=seed, drop_last=drop_last)]
    assert len(out) == data.num_batches(n, batch_size, drop_last)
    seen = torch.cat(out) if out else torch.empty(0, dtype=torch.int64)
    assert len(seen.unique()) == len(seen)  # no repeats
    expected = (n // batch_size) * batch_size if drop_last else n
    assert len(seen) == expected
    assert all(len(y) == batch_size for y in out[:-1])


@pytest.mark.parametrize("batch_size", [0, -3])
def test_bad_batch_size_fails_at_the_call(batch_size):
    images, labels = numbered(4)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        data.batches(images, labels, batch_size, shuffle=True)  # not iterated: the check is eager
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        data.num_batches(4, batch_size)


def test_batches_reject_float_images_and_mismatched_labels():
    images, labels = numbered(4)
    with pytest.raises(ValueError, match="uint8"):
        data.batches(images.float(), labels, 2, shuffle=False)
    with pytest.raises(ValueError, match="3 labels for 4 images"):
        data.batches(images, labels[:3], 2, shuffle=False)


# ----------------------------------------------------------------------------------------------------
# The real data set


@pytest.fixture(scope="module")
def real_dir() -> Path:
    missing = [name for name in data.FILES.values() if not (REAL_DIR / f"{name}.gz").is_file()]
    if missing:
        pytest.fail(
            f"the real Fashion-MNIST is not installed at {REAL_DIR} (missing {', '.join(missing)}); "
            "install it with `apt-get install dataset-fashion-mnist`"
        )
    return REAL_DIR


def python_lines_run(fn):
    """(fn(), how many Python lines ran while it did): a count that does not depend on the machine's load."""
    count = 0

    def trace(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return trace

    sys.settrace(trace)
    try:
        result = fn()
    finally:
        sys.settrace(None)
    return result, count


def test_real_data_loads_without_a_per_sample_loop_with_the_expected_shapes(real_dir):
    ds, lines = python_lines_run(lambda: data.load(real_dir, download=False))
    # Vectorized loading runs a bounded number of Python lines; a loop over the 10,000 test images
    # alone would run more.
    assert lines < 10_000, f"loading ran {lines} Python lines: a per-sample loop?"
    assert ds.train_images.shape == (60000, 28, 28) and ds.train_images.dtype == torch.uint8
    assert ds.test_images.shape == (10000, 28, 28) and ds.test_images.dtype == torch.uint8
    assert ds.train_labels.dtype == torch.int64 and ds.test_labels.dtype == torch.int64
    # Fashion-MNIST is exactly balanced: 6000 training and 1000 test images per class.
    assert ds.train_labels.bincount().tolist() == [6000] * 10
    assert ds.test_labels.bincount().tolist() == [1000] * 10
    assert int(ds.train_images.min()) == 0 and int(ds.train_images.max()) == 255

    sub = ds.subset(train=2000, seed=0)
    assert all(140 <= count <= 260 for count in sub.train_labels.bincount(minlength=10).tolist())


def test_real_data_matches_the_published_checksums(real_dir):
    report = data.verify(real_dir)
    assert [(key, ok) for key, _, ok, _ in report] == [(key, True) for key in data.FILES], report


def test_real_data_is_found_in_the_system_dir(real_dir, monkeypatch):
    monkeypatch.setattr(data, "SYSTEM_DIR", real_dir)
    assert data.locate() == real_dir
