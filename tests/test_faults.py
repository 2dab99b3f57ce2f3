"""The fault-injection suite: damaged state and a misbehaving machine give a clear error and lose nothing.

For each kind of state a bnlab command reads (the run directory, its checkpoint, config.json and
metrics.csv, the Fashion-MNIST IDX files raw and gzip) and each fault (truncated, zero-length, random
bytes, bytes flipped with the length kept, a foreign but valid file, missing, no permission, a directory
where a file belongs), the fault is applied to a copy of a real run and every command that reads that
state runs. Each command either fails with exit code 2 and one line naming the damaged path, without a
traceback, leaving every file that existed before unchanged; or it succeeds without touching the damaged
state; or (metrics.csv, a copy of the checkpoint's history, under `--resume`) it rebuilds it with a
one-line notice. The compiled-kernel and study caches have their own table in test_fault_caches.py.

Then crash consistency (SIGKILL at random points, resumed, ends with the uninterrupted run's metrics; a
killed data-parallel launcher leaves no worker behind), a full disk, and the smaller items of issue 11.

Root reads files whatever their mode bits, so as root the permission faults run the command in a
subprocess without the capabilities that override them (`setpriv`, util-linux).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bnlab import data, files
from bnlab.cli import main
from bnlab.training import TrainConfig, rundir, train

REAL_DATA = Path("/usr/share/datasets/fashion-mnist")
TINY = ["--train-subset", "256", "--test-subset", "128", "--batch-size", "64", "--threads", "1"]
DROP_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
            "--inh-caps", "-dac_override,-dac_read_search"]


@pytest.fixture(scope="module")
def real_data() -> Path:
    if data.locate(REAL_DATA) is None:
        pytest.fail(f"the real Fashion-MNIST is needed in {REAL_DATA}: apt-get install dataset-fashion-mnist")
    return REAL_DATA


def run_cli(argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `bnlab ARGV` in this process; an exception the CLI lets through
    (a traceback for the user) fails the test where it is raised."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# The commands of a subprocess run: each one's exit code, stdout and stderr (a traceback if it escaped).
_DRIVER = """
import contextlib, io, json, sys, traceback
from bnlab.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:
            code = exc.code
        except BaseException:
            traceback.print_exc()
            code = "escaped"
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def run_cli_without_privilege(argvs: list[list]) -> list[tuple[int, str, str]]:
    """Run the commands in one subprocess in which file permissions bind, as they do for a user."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.fail("as root, the permission faults need setpriv (util-linux) to drop CAP_DAC_OVERRIDE")
        prefix = DROP_DAC
    proc = subprocess.run([*prefix, sys.executable, "-c", _DRIVER, json.dumps([[str(a) for a in argv] for argv in argvs])],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return [tuple(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])]


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under `roots` and its sha256 (directories as "dir"); unreadable entries as "?"."""
    found = {}
    for root in roots:
        if not os.path.lexists(root):
            continue
        for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
            try:
                found[str(path)] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
            except OSError:
                found[str(path)] = "?"
    return found


def assert_unchanged(before: dict, after: dict) -> None:
    changed = [path for path, digest in before.items() if after.get(path) != digest]
    assert not changed, f"files changed or lost: {changed}"


# ---- the faults ------------------------------------------------------------------------------------


def truncated(path: Path, foreign: Path) -> None:
    content = path.read_bytes()
    path.write_bytes(content[: len(content) // 2])


def zero_length(path: Path, foreign: Path) -> None:
    path.write_bytes(b"")


def random_bytes(path: Path, foreign: Path) -> None:
    path.write_bytes(random.Random(1).randbytes(max(path.stat().st_size, 64)))


def flipped(path: Path, foreign: Path) -> None:
    """Up to 4 KB in the middle overwritten (every bit inverted), the length kept."""
    content = bytearray(path.read_bytes())
    width = min(4096, max(1, len(content) // 8))
    start = (len(content) - width) // 2
    content[start:start + width] = bytes(b ^ 0xFF for b in content[start:start + width])
    path.write_bytes(bytes(content))


def foreign_file(path: Path, foreign: Path) -> None:
    """The same file of another, valid source: another run's, or other data of the right format."""
    shutil.copyfile(foreign, path)


def missing(path: Path, foreign: Path) -> None:
    path.unlink()


def no_permission(path: Path, foreign: Path) -> None:
    path.chmod(0)


def directory(path: Path, foreign: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "something").write_text("a directory where a file belongs")


FAULTS = [truncated, zero_length, random_bytes, flipped, foreign_file, missing, no_permission, directory]


# ---- the runs --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, real_data) -> Path:
    """base/run: a finished 1-epoch bn-lenet run; base/foreign: a lenet run; base/relabelled: the run's
    config.json naming bn-lenet-torch, a model its weights also load into; base/alien.pt: a valid torch
    file that is no checkpoint; base/unsafe.pt: one that needs unpickling code."""
    base = tmp_path_factory.mktemp("runs")
    for name, model in (("run", "bn-lenet"), ("foreign", "lenet")):
        code = main(["train", "--model", model, "--epochs", "1", "--out", str(base / name), "--data-dir",
                     str(real_data), "--no-download", *TINY])
        assert code == 0
    stored = json.loads((base / "run" / "config.json").read_text())
    stored["config"]["model"] = "bn-lenet-torch"
    (base / "relabelled").mkdir()
    files.write_json(base / "relabelled" / "config.json", stored)
    torch.save({"weights": torch.ones(3)}, base / "alien.pt")
    torch.save({"model": {}, "note": io.StringIO}, base / "unsafe.pt")  # a class: weights_only refuses it
    return base


def run_commands(run: Path, data_dir: Path) -> dict[str, list]:
    """Every command that reads a run directory."""
    return {
        "resume": ["train", "--out", run, "--resume", "--epochs", "2", "--no-download", "--data-dir", data_dir],
        "evaluate": ["evaluate", run, "--no-download", "--data-dir", data_dir],
        "inspect": ["inspect", run],
        "doctor": ["doctor", run, "--examples", "256", "--no-download", "--data-dir", data_dir],
    }


SUCCESS = {"resume": {0}, "evaluate": {0}, "inspect": {0}, "doctor": {0, 1}}  # doctor: 1 = warnings found

# For each file of a run: the foreign file to use, and which commands must refuse each fault
# ("error"), which must work without it ("ok") and which rebuild it with a notice ("rebuilt").
RUN_FILES = {
    "checkpoint.pt": ("foreign/checkpoint.pt", {}),
    "config.json": ("foreign/config.json", {}),
    "metrics.csv": ("foreign/metrics.csv", {"resume": "rebuilt", "evaluate": "ok", "inspect": "ok", "doctor": "ok"}),
}


def expected_outcome(name: str, fault, command: str) -> str:
    outcome = RUN_FILES[name][1].get(command, "error")
    if name == "metrics.csv" and command == "resume" and fault is directory:
        return "error"  # bnlab never deletes a directory of the user's to rewrite a file
    return outcome


def check_outcome(outcome: str, command: str, code, out: str, err: str, before: dict, after: dict,
                  damaged: Path) -> None:
    assert "Traceback" not in err and code != "escaped", err
    if outcome == "error":
        assert code == 2, (code, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bnlab: error: "), err
        assert str(damaged) in lines[0] or str(damaged.parent) in lines[0], lines[0]
        assert_unchanged(before, after)
    elif outcome == "ok":
        assert code in SUCCESS[command], (code, err)
        assert_unchanged(before, after)
    else:  # rebuilt
        assert code == 0, (code, err)
        assert f"notice: {damaged}" in out and "rewritten from the checkpoint" in out, out


def fault_cases():
    for name in RUN_FILES:
        for fault in FAULTS:
            for command in SUCCESS:
                yield pytest.param(name, fault, command, id=f"{name}-{fault.__name__}-{command}")


def damaged_run(runs: Path, tmp_path: Path, name: str, fault) -> tuple[Path, Path]:
    run = tmp_path / "run"
    shutil.copytree(runs / "run", run)
    fault(run / name, runs / RUN_FILES[name][0])
    return run, run / name


@pytest.mark.parametrize("name, fault, command", [c for c in fault_cases() if c.values[1] is not no_permission])
def test_damaged_run_file(runs, real_data, tmp_path, capsys, name, fault, command):
    run, damaged = damaged_run(runs, tmp_path, name, fault)
    before = snapshot(run)
    code, out, err = run_cli(run_commands(run, real_data)[command], capsys)
    outcome = expected_outcome(name, fault, command)
    check_outcome(outcome, command, code, out, err, before, snapshot(run), damaged)
    if outcome == "rebuilt":  # metrics.csv is the checkpoint's history again, the resumed epoch included
        written = rundir.read_metrics(run)
        history = [rundir.EpochMetrics(**m) for m in rundir.load_checkpoint(run)["history"]]
        assert [m.epoch for m in written] == [m.epoch for m in history] == [1, 2]
        for row, truth in zip(written, history):
            assert abs(row.train_loss - truth.train_loss) < 1e-6 and abs(row.test_acc - truth.test_acc) < 1e-6


@pytest.mark.parametrize("name", list(RUN_FILES))
def test_unreadable_run_file(runs, real_data, tmp_path, name):
    run, damaged = damaged_run(runs, tmp_path, name, no_permission)
    commands = run_commands(run, real_data)
    readers = [command for command in commands if command != "resume"]
    for batch in (readers, ["resume"]):  # the readers first: a successful resume changes the run
        before = snapshot(run)
        results = run_cli_without_privilege([commands[command] for command in batch])
        after = snapshot(run)
        for command, (code, out, err) in zip(batch, results):
            check_outcome(expected_outcome(name, no_permission, command), command, code, out, err, before, after,
                          damaged)


@pytest.mark.parametrize("variant", ["alien", "unsafe", "relabelled"])
def test_checkpoint_or_config_of_another_kind(runs, real_data, tmp_path, capsys, variant):
    """A valid torch file that is no checkpoint, one whose unpickling would run code, and a config.json
    naming a model the weights also fit (which would relabel the run silently)."""
    run = tmp_path / "run"
    shutil.copytree(runs / "run", run)
    if variant == "relabelled":
        shutil.copyfile(runs / "relabelled" / "config.json", run / "config.json")
    else:
        shutil.copyfile(runs / f"{variant}.pt", run / "checkpoint.pt")
    expected = {"alien": "is a torch file but not a bnlab checkpoint", "unsafe": "refuses to unpickle",
                "relabelled": "was trained as bn-lenet (avg pooling)"}[variant]
    before = snapshot(run)
    for command, argv in run_commands(run, real_data).items():
        code, out, err = run_cli(argv, capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, (command, err)
        assert "weights_only=False" not in err  # torch's advice, which would run the file's code
    assert_unchanged(before, snapshot(run))


# ---- the run directory itself -------------------------------------------------------------------------


def dir_missing(run: Path) -> None:
    shutil.rmtree(run)


def dir_is_a_file(run: Path) -> None:
    shutil.rmtree(run)
    run.write_text("not a run")


def dir_foreign(run: Path) -> None:
    shutil.rmtree(run)
    run.mkdir()
    (run / "holiday.jpg").write_bytes(b"\xff\xd8\xff")


def dir_no_permission(run: Path) -> None:
    run.chmod(0)


@pytest.mark.parametrize("fault", [dir_missing, dir_is_a_file, dir_foreign, dir_no_permission],
                         ids=lambda f: f.__name__)
def test_damaged_run_directory(runs, real_data, tmp_path, capsys, fault):
    run = tmp_path / "run"
    shutil.copytree(runs / "run", run)
    fault(run)
    before = snapshot(tmp_path)
    commands = run_commands(run, real_data)
    if fault is dir_no_permission:
        results = run_cli_without_privilege(list(commands.values()))
    else:
        results = [run_cli(argv, capsys) for argv in commands.values()]
    for command, (code, out, err) in zip(commands, results):
        assert code == 2 and "Traceback" not in err, (command, code, err)
        assert len(err.strip().splitlines()) == 1 and str(run) in err, (command, err)
    run.chmod(0o755) if run.is_dir() else None
    assert_unchanged(before, snapshot(tmp_path))


# ---- the data files ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_copies(tmp_path_factory, real_data) -> dict[str, Path]:
    """The real files gzip-compressed and raw, and for each a foreign valid train-images file: the
    training images in reverse order (a well-formed IDX file only the checksum can tell apart)."""
    base = tmp_path_factory.mktemp("data")
    copies = {"gz": base / "gz", "raw": base / "raw"}
    shutil.copytree(real_data, copies["gz"])
    copies["raw"].mkdir()
    for path in copies["gz"].iterdir():
        (copies["raw"] / path.name.removesuffix(".gz")).write_bytes(gzip.decompress(path.read_bytes()))
    raw = (copies["raw"] / "train-images-idx3-ubyte").read_bytes()
    images = [raw[16 + i * 784: 16 + (i + 1) * 784] for i in range(60000)]
    reversed_images = raw[:16] + b"".join(reversed(images))
    (base / "foreign-raw").write_bytes(reversed_images)
    (base / "foreign-gz").write_bytes(gzip.compress(reversed_images, compresslevel=1))
    return copies


def data_commands(data_dir: Path, run: Path, new_run: Path) -> dict[str, list]:
    return {
        "train": ["train", "--out", new_run, "--epochs", "1", "--no-download", "--data-dir", data_dir, *TINY],
        "evaluate": ["evaluate", run, "--no-download", "--data-dir", data_dir],
        "verify": ["data", "verify", "--data-dir", data_dir],
    }


def damaged_data(data_copies, runs, tmp_path, compression: str, fault, target: str = "train-images-idx3-ubyte"):
    data_dir = tmp_path / "data"
    shutil.copytree(data_copies[compression], data_dir)
    name = target + (".gz" if compression == "gz" else "")
    fault(data_dir / name, data_copies[compression].parent / f"foreign-{compression}")
    run = tmp_path / "run"
    shutil.copytree(runs / "run", run)
    return data_dir, data_dir / name, run


def check_data_outcome(command: str, code, out: str, err: str, damaged: Path, new_run: Path) -> None:
    assert "Traceback" not in err and code != "escaped", err
    if command == "verify":  # a report per file, the damaged one marked BAD
        assert code in (1, 2), (code, out, err)
        assert f"BAD {str(damaged).removesuffix('.gz')}" in out, (out, err)
        return
    assert code == 2, (command, code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bnlab: error: "), err
    assert damaged.name.removesuffix(".gz") in lines[0], lines[0]
    assert not new_run.exists(), "a failed start must leave no run directory"


@pytest.mark.parametrize("compression", ["gz", "raw"])
@pytest.mark.parametrize("fault", [f for f in FAULTS if f is not no_permission], ids=lambda f: f.__name__)
def test_damaged_data_file(data_copies, runs, tmp_path, capsys, compression, fault):
    data_dir, damaged, run = damaged_data(data_copies, runs, tmp_path, compression, fault)
    before = snapshot(data_dir, run)
    new_run = tmp_path / "new-run"
    for command, argv in data_commands(data_dir, run, new_run).items():
        code, out, err = run_cli(argv, capsys)
        check_data_outcome(command, code, out, err, damaged, new_run)
    assert_unchanged(before, snapshot(data_dir, run))


@pytest.mark.parametrize("compression", ["gz", "raw"])
def test_unreadable_data_file(data_copies, runs, tmp_path, compression):
    data_dir, damaged, run = damaged_data(data_copies, runs, tmp_path, compression, no_permission)
    before = snapshot(data_dir, run)
    new_run = tmp_path / "new-run"
    commands = data_commands(data_dir, run, new_run)
    for command, (code, out, err) in zip(commands, run_cli_without_privilege(list(commands.values()))):
        check_data_outcome(command, code, out, err, damaged, new_run)
    assert_unchanged(before, snapshot(data_dir, run))


def relabelled(path: Path, foreign: Path) -> None:
    """Every label moved to the next class: a well-formed labels file only the checksum can tell apart."""
    content = bytearray(path.read_bytes())
    content[8:] = bytes((label + 1) % 10 for label in content[8:])
    path.write_bytes(bytes(content))


def test_labels_changed_but_well_formed_are_caught_too(data_copies, runs, tmp_path, capsys):
    data_dir, damaged, run = damaged_data(data_copies, runs, tmp_path, "raw", relabelled, "t10k-labels-idx1-ubyte")
    code, _, err = run_cli(data_commands(data_dir, run, tmp_path / "new")["evaluate"], capsys)
    assert code == 2 and "t10k-labels-idx1-ubyte" in err and "sha256" in err


# ---- crash consistency ---------------------------------------------------------------------------------


def metrics_without_speed(run: Path) -> list[tuple]:
    return [(m.epoch, m.train_loss, m.train_acc, m.test_loss, m.test_acc) for m in rundir.read_metrics(run)]


def bnlab_process(argv: list) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bnlab.cli", *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def kill_after_lines(process: subprocess.Popen, lines: int, delay: float) -> None:
    """SIGKILL `process` once it has printed `lines` epoch lines and then `delay` seconds have passed
    (or when it ends first)."""
    seen = 0
    while seen < lines:
        line = process.stdout.readline()
        if not line:
            break
        seen += line.startswith("epoch ")
    time.sleep(delay)
    process.kill()
    process.wait()


CRASH_RUN = ["--train-subset", "1024", "--test-subset", "256", "--batch-size", "64", "--threads", "1",
             "--no-download"]


def test_random_kills_then_resume_end_with_the_uninterrupted_metrics(tmp_path, real_data):
    epochs = 4
    uninterrupted = tmp_path / "uninterrupted"
    assert main(["train", "--epochs", str(epochs), "--out", str(uninterrupted), "--data-dir", str(real_data),
                 *CRASH_RUN]) == 0
    run = tmp_path / "killed"
    rng = random.Random(11)
    for attempt in range(5):
        resume = ["--resume"] if attempt else []
        process = bnlab_process(["train", "--epochs", epochs, "--out", run, "--data-dir", real_data, *CRASH_RUN,
                                 *resume])
        kill_after_lines(process, rng.choice([0, 1]), rng.uniform(0.0, 1.5))
        leftovers = [p.name for p in run.glob("*")] if run.exists() else []
        assert not any(name.endswith(".tmp") and not name.startswith(".") for name in leftovers), leftovers
    finish = bnlab_process(["train", "--epochs", epochs, "--out", run, "--data-dir", real_data, *CRASH_RUN,
                            "--resume"] if (run / "config.json").exists() else
                           ["train", "--epochs", epochs, "--out", run, "--data-dir", real_data, *CRASH_RUN])
    output, _ = finish.communicate(timeout=600)
    assert finish.returncode == 0, output
    assert metrics_without_speed(run) == metrics_without_speed(uninterrupted)
    assert not list(run.glob(".*.tmp")), "temporaries of killed writers are cleared on resume"


def descendants(pid: int) -> set[int]:
    """The processes below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_killed_data_parallel_launcher_leaves_no_worker_and_the_run_resumes(tmp_path, real_data):
    common = ["--epochs", "2", "--data-dir", real_data, "--train-subset", "512", "--test-subset", "256",
              "--batch-size", "64", "--no-download"]
    argv = ["train", "--nproc", "2", "--out", tmp_path / "run", *common]
    process = bnlab_process(argv)
    workers: set[int] = set()
    for _ in range(600):  # until both workers are up (or the run ended): at most a minute
        workers = {pid for pid in descendants(process.pid) if "spawn_main" in _cmdline(pid)}
        if len(workers) >= 2 or process.poll() is not None:
            break
        time.sleep(0.1)
    assert len(workers) == 2, f"expected two workers under the launcher, found {workers}"
    process.kill()  # SIGKILL: the launcher runs no cleanup
    process.wait()
    for _ in range(300):
        if not any(alive(pid) for pid in workers):
            break
        time.sleep(0.1)
    survivors = [pid for pid in workers if alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "workers outlived their killed launcher"
    resume = argv + (["--resume"] if (tmp_path / "run" / "config.json").exists() else [])
    finish = bnlab_process(resume)
    output, _ = finish.communicate(timeout=600)
    assert finish.returncode == 0, output
    # A data-parallel step is the one-process step up to float rounding: the resumed run ends where an
    # uninterrupted one-process run does.
    reference = tmp_path / "one-process"
    assert main([str(a) for a in ["train", "--out", reference, *common]]) == 0
    resumed, uninterrupted = rundir.read_metrics(tmp_path / "run"), rundir.read_metrics(reference)
    assert [m.epoch for m in resumed] == [m.epoch for m in uninterrupted] == [1, 2]
    for got, want in zip(resumed, uninterrupted):
        assert abs(got.train_loss - want.train_loss) < 1e-4 and abs(got.test_loss - want.test_loss) < 1e-4


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


# ---- a full disk -----------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(directory: Path, size: int):
    if os.geteuid() != 0:
        pytest.fail("the full-disk test mounts a small tmpfs, which needs root (CI runs as root)")
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], check=True)
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(runs, real_data, tmp_path, capsys):
    used = sum(-(-p.stat().st_size // 4096) * 4096 for p in (runs / "run").iterdir())
    with tmpfs(tmp_path / "disk", used + 16 * 4096) as disk:  # room to rewrite config.json, not a checkpoint
        run = disk / "run"
        shutil.copytree(runs / "run", run)
        before = snapshot(run / "checkpoint.pt", run / "metrics.csv")
        code, out, err = run_cli(run_commands(run, real_data)["resume"], capsys)
        assert code == 2 and "Traceback" not in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert "No space left on device" in err and "checkpoint.pt" in err and "--resume" in err, err
        assert_unchanged(before, snapshot(run / "checkpoint.pt", run / "metrics.csv"))
        assert not list(run.glob(".*.tmp"))


def test_a_failing_writer_keeps_the_previous_file(tmp_path, monkeypatch):
    """The same on any machine: writes that fail with ENOSPC from the kernel (/dev/full)."""
    target = tmp_path / "checkpoint.pt"
    target.write_bytes(b"previous")

    def full_disk(path):
        tmp = tmp_path / f".{path.name}.full.tmp"
        tmp.touch()
        return os.open("/dev/full", os.O_WRONLY), str(tmp)

    monkeypatch.setattr(files, "_temporary", full_disk)
    with pytest.raises(files.WriteError, match="could not write .*checkpoint.pt: No space left on device; its "
                                               "previous content is unchanged"):
        rundir.save_checkpoint(tmp_path, {"model": {}})
    assert target.read_bytes() == b"previous"
    assert not list(tmp_path.glob(".*.tmp"))


# ---- smaller items -----------------------------------------------------------------------------------


def test_lost_config_is_not_an_invitation_to_overwrite_the_run(runs, real_data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "run", run)
    (run / "config.json").unlink()
    before = snapshot(run)
    code, _, err = run_cli(run_commands(run, real_data)["resume"], capsys)
    assert code == 2 and "config.json is missing" in err and "bnlab train --out" not in err
    code, _, err = run_cli(["train", "--out", run, "--epochs", "1", "--no-download", "--data-dir", real_data, *TINY],
                           capsys)
    assert code == 2 and "already holds a run (checkpoint.pt, metrics.csv, curves.png)" in err
    assert_unchanged(before, snapshot(run))


def test_a_run_in_its_first_epoch_is_said_to_be_running(tmp_path, capsys):
    run = tmp_path / "run"
    with rundir.run_lock(run):
        rundir.save_config(run, TrainConfig(), torch.device("cpu"), REAL_DATA)
        code, _, err = run_cli(["evaluate", run], capsys)
    assert code == 2 and "its first epoch is still running" in err
    code, _, err = run_cli(["inspect", run], capsys)
    assert code == 2 and "stopped before it finished its first epoch" in err and "--resume" in err


def test_failed_start_leaves_no_directory_and_out_must_be_a_directory(tmp_path, capsys):
    run = tmp_path / "deep" / "run"
    code, _, err = run_cli(["train", "--out", run, "--no-download", "--data-dir", tmp_path / "nodata"], capsys)
    assert code == 2 and "Fashion-MNIST not found" in err
    assert not (tmp_path / "deep").exists()
    (tmp_path / "afile").write_text("mine")
    code, _, err = run_cli(["train", "--out", tmp_path / "afile", "--no-download"], capsys)
    assert code == 2 and "is a file, but a run needs a directory" in err
    assert (tmp_path / "afile").read_text() == "mine"


def test_temporaries_of_a_killed_writer_are_cleared_on_resume(runs, real_data, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs / "run", run)
    (run / ".curves.png.k1ll3d00.tmp").write_bytes(b"")
    code, _, err = run_cli(run_commands(run, real_data)["resume"], capsys)
    assert code == 0, err
    assert not list(run.glob(".*.tmp"))


@pytest.mark.parametrize("args, fragment", [
    (["train", "--device", "cudax"], "device must be cpu, cuda, cuda:N"),
    (["train", "--device", "cuda:abc"], "device must be cpu, cuda, cuda:N"),
    (["evaluate", "x", "--device", "gpu"], None),  # no run: the run is checked first
    (["train", "--seed", "99999999999999999999999"], "--seed: expected an integer from 0 to 4294967295"),
    (["train", "--seed", "-1"], "--seed: expected an integer from 0 to 4294967295"),
    (["train", "--lr", "abc"], "--lr: expected a positive number, got 'abc'"),
    (["train", "--epochs", "two"], "--epochs: expected a positive integer, got 'two'"),
    (["train", "--momentum", "nan"], "--momentum: expected a number, got 'nan'"),
])
def test_argument_errors_say_what_was_expected(args, fragment, capsys, tmp_path):
    code, _, err = run_cli([*args, "--no-download"] if args[0] == "train" else args, capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "invalid" not in err or "invalid choice" in err  # argparse's internal type names stay hidden
    if fragment:
        assert fragment in err, err


def test_library_refuses_bad_seed_and_device():
    for config, fragment in ((TrainConfig(seed=2**70), "seed must be an integer"),
                             (TrainConfig(device="cudax"), "device must be cpu")):
        with pytest.raises(ValueError, match=fragment):
            config.validate()


def test_one_epoch_is_not_one_epochs(runs, capsys):
    code, out, _ = run_cli(["inspect", runs / "run"], capsys)
    assert code == 0 and ", 1 epoch," in out


def test_a_notice_is_one_line_and_other_warnings_keep_their_form():
    """A cache rebuilt or a fallback taken is said on one line, not as a warning pointing into bnlab's source
    (the kernel cache's own tests check the notice end to end, in a subprocess)."""
    import warnings

    from bnlab import cli

    format = cli._one_line_warnings(warnings.formatwarning)
    notice = format(RuntimeWarning("bnlab: the cached kernel library K is damaged; rebuilding it"), RuntimeWarning,
                    "kernels.py", 293)
    assert notice == "bnlab: notice: the cached kernel library K is damaged; rebuilding it\n"
    other = format(DeprecationWarning("a warning of someone else's"), DeprecationWarning, "x.py", 5, "")
    assert other == warnings.formatwarning(DeprecationWarning("a warning of someone else's"), DeprecationWarning,
                                           "x.py", 5, "")
    before = warnings.formatwarning
    assert cli.main(["kernels"]) == 0 and warnings.formatwarning is before  # restored for main()'s caller


def tiny_net() -> torch.nn.Module:
    """A factory for `bnlab doctor --model`."""
    return torch.nn.Sequential(torch.nn.Linear(4, 3, bias=False), torch.nn.BatchNorm1d(3))


@pytest.mark.parametrize("fault", [truncated, zero_length, random_bytes, flipped, foreign_file, missing, directory],
                         ids=lambda f: f.__name__)
def test_damaged_weights_for_doctor(fault, tmp_path, capsys):
    """`bnlab doctor --weights FILE` reads a user's file: the same untrusted loader as checkpoints."""
    weights, foreign = tmp_path / "weights.pt", tmp_path / "foreign.pt"
    torch.save(tiny_net().state_dict(), weights)
    torch.save({"0.weight": torch.ones(5, 5)}, foreign)  # a valid state dict of another model
    fault(weights, foreign)
    before = snapshot(tmp_path)
    code, _, err = run_cli(["doctor", "--model", f"{__name__}:tiny_net", "--weights", weights], capsys)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert str(weights) in err, err
    assert_unchanged(before, snapshot(tmp_path))
