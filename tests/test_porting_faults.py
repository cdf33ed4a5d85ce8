"""port-weights under faults: full disks, read-only destinations, a failed sidecar, signals, NaN slopes.

Each test runs the CLI (in-process where it can; in a subprocess for signals, orbax's writer threads and a
file-size limit) and checks the exit status, the one-line message, and that the tree is unchanged but for the
intended output, with no temporary left. Tests run as root, where chmod stops nothing: write failures are
injected at the write calls (ENOSPC after half the bytes, EROFS/EACCES at open and mkdir), and the C++ writers
of orbax/tensorstore are stopped by RLIMIT_FSIZE.
"""

from __future__ import annotations

import ast
import builtins
import errno
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from porting_helpers import TINY, randomize_torch_state

import porting
import torch_ref
from porting.cli import main

CLASSES = 4
ARCH = ["--arch", "tiny"]  # the CLI's name for porting_helpers.TINY
TESTS_DIR = Path(__file__).resolve().parent
PORTING_DIR = TESTS_DIR.parent / "porting"
# orbax's asynchronous checkpointer used to hang 300 s after a failed directory creation; a child that has not
# exited after this long (its imports take a few seconds) counts as hung.
SUBPROCESS_TIMEOUT_S = 90
# Small enough that TINY's orbax arrays (about 200 kB in one OCDBT file) cannot be written.
FILE_SIZE_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    """tiny.pt (with its sidecar) and tiny.msgpack of one random TINY network, written by the code under test."""
    root = tmp_path_factory.mktemp("sources")
    model = torch_ref.Darknet53(num_classes=CLASSES, config=TINY)
    randomize_torch_state(model, seed=3)
    torch.save(model.state_dict(), root / "tiny.pt")
    porting.convert(root / "tiny.pt", root / "tiny.msgpack", config=TINY, leaky_slope=0.1)
    return root


@pytest.fixture
def work(tmp_path, sources) -> Path:
    """tmp_path holding src/ (copies of the sources) and an empty dst/."""
    shutil.copytree(sources, tmp_path / "src")
    (tmp_path / "dst").mkdir()
    return tmp_path


def tree(root: Path) -> dict[str, str]:
    """Every file and directory below root (hidden ones included) -> sha256 of its bytes ('dir' for directories)."""
    result = {}
    for path in sorted(root.rglob("*")):
        result[str(path.relative_to(root))] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def assert_refused(rc: int, err: str, *needles: str) -> None:
    """Exit 2 and one line `port-weights: error: ...` holding every needle, no traceback."""
    assert rc == 2, err
    assert err.startswith("port-weights: error: ") and err.strip().count("\n") == 0, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


def run(argv: list[str], capsys) -> tuple[int, str]:
    rc = main([*argv, *ARCH])
    return rc, capsys.readouterr().err


# -------------------------------------------------------------------------------------------- injected faults


class _HalfWritten:
    """A file whose first write stores half its bytes, then calls `then` (which raises or waits)."""

    def __init__(self, f, then) -> None:
        self._f, self._then = f, then

    def write(self, data) -> int:
        self._f.write(bytes(data[: len(data) // 2]))
        self._f.flush()
        return self._then()

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self) -> _HalfWritten:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def _disk_full() -> int:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def inject(under: Path, error: int, name_has: str = "", real_open=builtins.open):
    """An `open` replacement: writes to files below `under` (whose name holds `name_has`) hit `error`."""

    def fake_open(file, mode="r", *args, **kwargs):
        path = os.path.abspath(os.fspath(file)) if isinstance(file, str | os.PathLike) else ""
        if path.startswith(f"{under}{os.sep}") and name_has in os.path.basename(path) and set(mode) & set("wxa+"):
            if error != errno.ENOSPC:
                raise OSError(error, os.strerror(error), path)
            return _HalfWritten(real_open(file, mode, *args, **kwargs), _disk_full)
        return real_open(file, mode, *args, **kwargs)

    return fake_open


CASES = {  # DST name -> (direction, SRC name)
    "out.pt": ("flax2torch", "tiny.msgpack"),
    "out.safetensors": ("flax2torch", "tiny.msgpack"),
    "out.msgpack": ("torch2flax", "tiny.pt"),
    "out.weights": ("torch2darknet", "tiny.pt"),
}


@pytest.mark.parametrize("dst_name", sorted(CASES))
def test_a_full_disk_is_exit_2_naming_dst_and_leaves_nothing(work, monkeypatch, capsys, dst_name):
    direction, src_name = CASES[dst_name]
    dst, before = work / "dst" / dst_name, tree(work)
    monkeypatch.setattr(builtins, "open", inject(work / "dst", errno.ENOSPC))
    rc, err = run([direction, str(work / "src" / src_name), str(dst)], capsys)
    assert_refused(rc, err, f"cannot write {str(dst)!r}", "No space left on device", "nothing was written")
    assert tree(work) == before


@pytest.mark.parametrize("error", [errno.EROFS, errno.EACCES], ids=["EROFS", "EACCES"])
@pytest.mark.parametrize("dst_name", ["out.pt", "out.msgpack"])
def test_a_read_only_destination_is_exit_2_naming_dst_and_the_os_error(work, monkeypatch, capsys, error, dst_name):
    direction, src_name = CASES[dst_name]
    dst, before = work / "dst" / dst_name, tree(work)
    monkeypatch.setattr(builtins, "open", inject(work / "dst", error))
    rc, err = run([direction, str(work / "src" / src_name), str(dst)], capsys)
    assert_refused(rc, err, f"cannot write {str(dst)!r}", os.strerror(error))
    assert tree(work) == before


@pytest.mark.parametrize("dst_name", ["out.pt", "outdir"])
def test_too_little_free_space_is_refused_before_anything_is_written(work, monkeypatch, capsys, dst_name):
    src = work / "src" / ("tiny.msgpack" if dst_name == "out.pt" else "tiny.pt")
    dst, before = work / "dst" / dst_name, tree(work)
    usage = shutil.disk_usage(work)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    monkeypatch.setattr(builtins, "open", inject(work / "dst", errno.EIO))  # any write at all would fail loudly
    rc, err = run(["flax2torch" if dst_name == "out.pt" else "torch2flax", str(src), str(dst)], capsys)
    assert_refused(rc, err, f"cannot write {str(dst)!r}: it needs", "has 1,000 free")
    assert tree(work) == before


def test_a_pt_and_its_sidecar_appear_together_or_not_at_all(work, monkeypatch, capsys):
    src, dst = str(work / "src" / "tiny.msgpack"), work / "dst" / "out.pt"
    before = tree(work)
    with monkeypatch.context() as m:
        m.setattr(builtins, "open", inject(work / "dst", errno.ENOSPC, name_has=".meta.json"))
        rc, err = run(["flax2torch", src, str(dst)], capsys)
    assert_refused(rc, err, f"cannot write {str(dst) + '.meta.json'!r}", "No space left on device")
    assert tree(work) == before
    # The sidecar's rename fails after the .pt's succeeded: the .pt goes again.
    real_replace = os.replace
    with monkeypatch.context() as m:
        m.setattr(os, "replace", lambda a, b: _fail_if(b.endswith(".meta.json"), errno.EIO) or real_replace(a, b))
        rc, err = run(["flax2torch", src, str(dst)], capsys)
    assert_refused(rc, err, f"cannot write {str(dst) + '.meta.json'!r}", os.strerror(errno.EIO))
    assert tree(work) == before
    # Nothing is left to make a rerun say "already exists"; it writes both, and the slope survives.
    assert main(["flax2torch", src, str(dst), *ARCH]) == 0
    assert set(tree(work)) - set(before) == {"dst/out.pt", "dst/out.pt.meta.json"}
    assert json.loads((work / "dst" / "out.pt.meta.json").read_text())["preprocessing"]["leaky_slope"] == 0.1
    # --force over the pair, failing: the old pair stays as it was.
    written = tree(work)
    monkeypatch.setattr(builtins, "open", inject(work / "dst", errno.ENOSPC, name_has=".meta.json"))
    rc, err = run(["flax2torch", src, str(dst), "--force", "--num-classes", "3", "--reset-head"], capsys)
    assert_refused(rc, err, "No space left on device")
    assert tree(work) == written


def _fail_if(condition: bool, error: int) -> None:
    if condition:
        raise OSError(error, os.strerror(error))


@pytest.mark.parametrize("slope", ["nan", "inf", "-inf"])
def test_a_non_finite_leaky_slope_is_refused(work, capsys, slope):
    before = tree(work)
    rc, err = run(["torch2flax", str(work / "src" / "tiny.pt"), str(work / "dst" / "out.msgpack"),
                   f"--leaky-slope={slope}"], capsys)  # fmt: skip
    assert_refused(rc, err, "leaky_slope (--leaky-slope) must be a finite number", slope)
    assert tree(work) == before


def test_a_nan_slope_in_a_sidecar_is_refused_naming_the_sidecar(work, capsys):
    sidecar = work / "src" / "tiny.pt.meta.json"
    sidecar.write_text(json.dumps({"num_classes": CLASSES, "leaky_slope": math.nan}))  # json writes NaN
    before = tree(work)
    rc, err = run(["torch2flax", str(work / "src" / "tiny.pt"), str(work / "dst" / "out.msgpack")], capsys)
    assert_refused(rc, err, f"{sidecar}: metadata leaky_slope must be a finite number", "nan")
    assert tree(work) == before


def test_a_stop_whose_exception_was_swallowed_still_prevents_the_commit(work, monkeypatch):
    # Python drops an exception raised in a GC callback ("Exception ignored in ..."): the signal handler's Stopped
    # is lost, only its record stays. The writer must still not rename its temporaries into place.
    dst, before = work / "dst" / "out.pt", tree(work)
    real_write = porting.atomic.write_file

    def write_then_swallow(path: str, data: bytes) -> None:
        real_write(path, data)
        porting.errors.pending_stop.append(signal.SIGTERM)  # what the handler leaves behind

    monkeypatch.setattr(porting.errors, "pending_stop", [])
    monkeypatch.setattr(porting.atomic, "write_file", write_then_swallow)
    with pytest.raises(porting.errors.Stopped):
        porting.atomic.write_bytes({dst: b"complete", f"{dst}.meta.json": b"{}"})
    assert tree(work) == before


def test_every_torch_load_in_porting_is_weights_only():
    calls = []
    for path in sorted(PORTING_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            func = node.func if isinstance(node, ast.Call) else None
            if isinstance(func, ast.Attribute) and func.attr == "load" and ast.unparse(func.value) == "torch":
                flag = {k.arg: k.value for k in node.keywords}.get("weights_only")
                calls.append((f"{path.name}:{node.lineno}", isinstance(flag, ast.Constant) and flag.value is True))
    assert calls, "no torch.load found: the check looks at nothing"
    assert all(ok for _, ok in calls), calls


# ------------------------------------------------------------------------------------------------ subprocesses


def _child() -> None:
    """Entry of the subprocess: install the fault named in argv[1] (a JSON spec), then run the CLI."""
    spec = json.loads(sys.argv[1])
    under, real_open = os.path.abspath(spec["under"]), builtins.open
    if spec["fault"] == "read-only":  # a read-only file system: no file and no directory can be made there
        builtins.open = inject(Path(under), errno.EROFS)
        real_mkdir = os.mkdir

        def mkdir(path, *args, **kwargs):
            if os.path.abspath(os.fspath(path)).startswith(f"{under}{os.sep}"):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
            return real_mkdir(path, *args, **kwargs)

        os.mkdir = mkdir
    elif spec["fault"] == "file-size":  # reaches the C++ writers too (tensorstore): writes past the limit fail
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (spec["limit"], resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    elif spec["fault"] == "slow-write":  # half the bytes, then a long pause in which the test sends its signal

        def pause() -> int:
            real_open(spec["ready"], "w").close()
            time.sleep(SUBPROCESS_TIMEOUT_S)
            return 0

        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            return _HalfWritten(f, pause) if os.path.abspath(file).startswith(f"{under}{os.sep}") and "x" in mode else f

        builtins.open = fake_open
    raise SystemExit(main(spec["argv"]))


def _spawn(spec: dict) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS_DIR), str(TESTS_DIR.parent)]),
           "JAX_PLATFORMS": "cpu"}  # fmt: skip
    code = "import test_porting_faults as t; t._child()"
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(spec)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def _finish(proc: subprocess.Popen) -> str:
    """The child's stderr once it exits; a child still running after SUBPROCESS_TIMEOUT_S is killed (a hang)."""
    try:
        return proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise


def test_orbax_dst_in_a_read_only_directory_fails_in_seconds(work):
    dst, before = work / "dst" / "outdir", tree(work)
    proc = _spawn({"fault": "read-only", "under": str(work / "dst"),
                   "argv": ["torch2flax", str(work / "src" / "tiny.pt"), str(dst), *ARCH]})  # fmt: skip
    err = _finish(proc)
    assert_refused(proc.returncode, err, f"cannot write {str(dst)!r}", "Read-only file system")
    assert tree(work) == before


def test_orbax_on_a_full_disk_is_exit_2_and_leaves_no_orbax_temporary(work):
    dst, before = work / "dst" / "outdir", tree(work)
    proc = _spawn({"fault": "file-size", "under": str(work / "dst"), "limit": FILE_SIZE_LIMIT,
                   "argv": ["torch2flax", str(work / "src" / "tiny.pt"), str(dst), *ARCH]})  # fmt: skip
    err = _finish(proc)
    assert_refused(proc.returncode, err, f"cannot write {str(dst)!r}", "File too large")
    assert tree(work) == before


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_the_write_leaves_no_temporary(work, sig):
    dst, ready = work / "dst" / "out.pt", work.parent / f"{work.name}-ready"
    before = tree(work)
    proc = _spawn({"fault": "slow-write", "under": str(work / "dst"), "ready": str(ready),
                   "argv": ["flax2torch", str(work / "src" / "tiny.msgpack"), str(dst), *ARCH]})  # fmt: skip
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if not ready.exists():
        proc.kill()
        pytest.fail(f"the child never reached its write: {proc.communicate()}")
    assert any(".porting-tmp-" in name for name in tree(work)), "the signal must come while a temporary exists"
    proc.send_signal(sig)
    err = _finish(proc)
    assert proc.returncode == 128 + sig, err
    want = f"port-weights: stopped by {sig.name}; nothing was written ({dst} as it was, no temporary left)"
    assert err.strip() == want
    assert tree(work) == before


# ------------------------------------------------------------------------------------- the commit of a file set


def _old_set(root: Path) -> dict[Path, bytes]:
    """An existing .pt and its sidecar, as a user's earlier port-weights left them."""
    old = {root / "x.pt": b"old weights", root / "x.pt.meta.json": b'{"old": true}'}
    for path, data in old.items():
        path.write_bytes(data)
    return old


@pytest.mark.parametrize("after", [1, 2], ids=["between-renames", "after-the-last-rename"])
def test_a_signal_during_the_renames_restores_the_old_set_and_says_nothing_was_written(tmp_path, monkeypatch, after):
    from porting import atomic
    from porting.cli import signals_raise
    from porting.errors import Stopped

    old = _old_set(tmp_path)
    real_replace, calls = os.replace, []

    def replace_then_signal(src, dst):  # SIGTERM arrives just after the `after`-th new file is in place
        real_replace(src, dst)
        if atomic.TMP_TAG in os.fspath(src):
            calls.append(dst)
            if len(calls) == after:
                os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(atomic.os, "replace", replace_then_signal)
    with signals_raise(), pytest.raises(Stopped):
        atomic.write_bytes({path: b"new " + data for path, data in old.items()}, force=True)
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == old  # the old set, whole; no temporary, no backup


def test_a_write_killed_mid_commit_is_repaired_by_the_next_write_of_the_same_files(tmp_path):
    from porting import atomic

    old = _old_set(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited: what kill -9 leaves behind
    # Killed after moving the old .pt aside and before its new one arrived; the sidecar's temporary half-written.
    os.replace(tmp_path / "x.pt", tmp_path / f".x.pt{atomic.OLD_TAG}{pid}-0")
    (tmp_path / f".x.pt.meta.json{atomic.TMP_TAG}{pid}-0").write_bytes(b"half")
    (tmp_path / f".x.pt{atomic.TMP_TAG}{os.getpid()}-0").write_bytes(b"a live writer's")  # not ours to remove
    with pytest.raises(porting.PortingError, match="already exists"):
        atomic.write_bytes({path: b"new" for path in old})  # no --force: the restored old file is refused
    assert (tmp_path / "x.pt").read_bytes() == old[tmp_path / "x.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["x.pt", "x.pt.meta.json",
                                                                  f".x.pt{atomic.TMP_TAG}{os.getpid()}-0"])  # fmt: skip
