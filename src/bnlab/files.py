"""Atomic file writes: a crash or Ctrl-C leaves either the old file or the new one, never half of one.

A write that fails (a full disk, a directory in the way, no permission) raises `WriteError`, an OSError
whose message names the file, says why, and says that the file's previous content is unchanged.
A SIGKILL can still leave a temporary file (``.NAME.*.tmp``) beside the target; `remove_temporaries`
clears them, and the run directory does so whenever it takes its lock.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


class WriteError(OSError):
    """Writing a file failed; the file keeps its previous content (or is still absent)."""

    def __init__(self, path: Path, exc: OSError):
        super().__init__(exc.errno, exc.strerror or str(exc), str(path))
        self.message = (f"could not write {path}: {exc.strerror or exc}; its previous content is unchanged"
                        + ("; free some space and try again" if exc.errno == 28 else ""))

    def __str__(self) -> str:
        return self.message


def _file_mode() -> int:
    # mkstemp creates 0600 files; a finished file should get the mode open() would give it.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_MODE = _file_mode()


def _temporary(path: Path) -> tuple[int, str]:
    """An open descriptor and the name of a new temporary file beside `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _MODE)
    return fd, tmp


@contextmanager
def atomic_open(path: PathLike, mode: str = "w") -> Iterator[IO]:
    """Open a temporary file beside `path`; on success flush, fsync and rename it over `path`.
    WriteError (an OSError) if any of that fails; `path` is then left as it was."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _temporary(path)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _discard(tmp)
        raise exc if isinstance(exc, WriteError) else WriteError(path, exc) from None
    except BaseException:
        _discard(tmp)
        raise


def _discard(tmp) -> None:
    if tmp is not None and os.path.lexists(tmp):
        os.unlink(tmp)


def write_bytes(path: PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def write_text(path: PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


def write_json(path: PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove_temporaries(directory: PathLike) -> list[Path]:
    """Delete the temporary files that a killed writer left in `directory` (``.NAME.XXXXXXXX.tmp``);
    the ones removed. Call it only while no other process writes there (under the run's lock)."""
    leftovers = [p for p in Path(directory).glob(".*.tmp") if p.is_file() and p.name.count(".") >= 3]
    for p in leftovers:
        p.unlink()
    return leftovers


def load_torch_file(path: PathLike, map_location="cpu", *, fix: str):
    """Load a file written by `torch.save` as untrusted data: tensors and plain containers only
    (`weights_only`, so no code can run), after checking the CRC-32 of every entry of its zip archive,
    which torch's loader does not (bytes flipped inside a tensor would load as silently wrong values).
    ValueError naming the file and what is wrong, ending with `fix` (what the user can do)."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"the CRC-32 of its entry {bad} does not match its content")
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as exc:
        raise unreadable(path, exc) from None
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            raise ValueError(f"{path} holds Python objects other than tensors and plain data, which bnlab refuses "
                             f"to unpickle (that could run code): bnlab did not write it; {fix}") from None
        raise ValueError(f"{path} is damaged ({one_line(exc)}); {fix}") from None
    except Exception as exc:  # noqa: BLE001 - zip and torch's reader raise many kinds: all mean damage
        raise ValueError(f"{path} is damaged (truncated, overwritten or not a torch file: {one_line(exc)}); "
                         f"{fix}") from None


def one_line(exc: BaseException) -> str:
    """`exc` as "Type: first line of its message", at most 200 characters: for one-line errors."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:200]


def unreadable(path: PathLike, exc: OSError) -> ValueError:
    """The one-line error for a file that cannot be read (no permission, a directory, ...)."""
    return ValueError(f"cannot read {path} ({exc.strerror or exc}); check that it is a file you may read")
