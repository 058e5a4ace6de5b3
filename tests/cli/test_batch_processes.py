"""``diffboost batch`` as separate processes: SIGKILL in the middle of a write and a rerun, and
``torchrun`` with two ranks (gloo on CPU) against one process."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from factories import make_flux

#: one thread per process: a rank's images then equal one process's bit for bit (threaded reductions
#: may add up in another order), and two ranks do not fight over the machine's cores
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}

#: runs ``diffboost`` with ``save_output`` wrapped: rank CRASH_RANK dies with SIGKILL halfway through
#: writing its CRASH_AT-th output (a temporary file already holds part of it)
WRAPPER = textwrap.dedent("""
    import os, signal, sys
    import diffboost.batch as batch
    from diffboost.cli import main

    crash_at = int(os.environ.get("CRASH_AT", "0"))
    crash_rank = int(os.environ.get("CRASH_RANK", "0"))
    seen = []
    original = batch.save_output

    def save_output(output, path, settings):
        seen.append(path)
        if crash_at and len(seen) == crash_at and int(os.environ.get("RANK", "0")) == crash_rank:
            tmp = path.with_name("." + path.name + ".abcd1234.tmp")
            tmp.write_bytes(b"\\x89PNG half an image")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(output, path, settings)

    batch.save_output = save_output
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("procs")
    make_flux().save_pretrained(root / "flux")
    (root / "wrapper.py").write_text(WRAPPER)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"shape {i}", "seed": i}) + "\n" for i in range(7))
                       + '{"prompt": ""}\n')  # a bad row: recorded, the run goes on
    return root


def _batch(setup: Path, out: Path, *, ranks: int = 1, env: dict | None = None) -> subprocess.CompletedProcess:
    args = ["batch", str(setup / "prompts.jsonl"), "--model", str(setup / "flux"), "--steps", "2", "--size", "64",
            "--preset", "none", "--out", str(out), "--quiet"]
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    return subprocess.run(launcher + [str(setup / "wrapper.py"), *args], env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=600)


def _files(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.png"))}


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_sigkill_in_a_write_loses_only_that_image_and_a_rerun_finishes(setup, tmp_path):
    out = tmp_path / "killed"
    run = _batch(setup, out, env={"CRASH_AT": "4"})
    assert run.returncode == -signal.SIGKILL
    before = _files(out)
    assert len(before) == 3  # the three finished images survive the kill
    assert {r["file"] for r in _records(out) if r["status"] == "done"} == set(before)
    assert list(out.glob(".*.tmp")), "the killed write left its temporary file (cleaned up by the rerun)"
    rerun = _batch(setup, out)
    assert rerun.returncode == 1, rerun.stderr  # the bad row still cannot be made
    assert "made 4 images, 3 already done, 7 in all" in rerun.stdout
    after = _files(out)
    assert len(after) == 7 and all(after[name] == digest for name, digest in before.items())
    done = [r for r in _records(out) if r["status"] == "done"]
    assert sorted(r["file"] for r in done) == sorted(after)  # one manifest row per image, none twice
    assert not list(out.glob(".*.tmp")) and not [p for p in out.iterdir() if p.suffix == ".png" and p.stat().st_size < 100]
    reference = tmp_path / "straight"
    assert _batch(setup, reference).returncode == 1
    assert _files(reference) == after  # the same images, bit for bit, as a run never killed


def test_torchrun_two_ranks_make_the_same_files_as_one_process(setup, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert _batch(setup, one).returncode == 1
    run = _batch(setup, two, ranks=2)
    assert run.returncode == 1, run.stderr[-2000:]  # the bad row; the rest is made
    assert "rank 0: made 4" in run.stdout and "rank 1: made 3" in run.stdout
    assert "made 7 images, 0 already done, 7 in all" in run.stdout and "images/s in all" in run.stdout
    assert _files(two) == _files(one) and len(_files(one)) == 7
    records = _records(two)
    done = [r["file"] for r in records if r["status"] == "done"]
    assert sorted(done) == sorted(set(done)) == sorted(_files(two))
    assert [r["row"] for r in records if r["status"] == "error"] == [8]  # recorded once (by rank 0)


def test_torchrun_rerun_after_one_rank_died_resumes(setup, tmp_path):
    out = tmp_path / "crashed"
    run = _batch(setup, out, ranks=2, env={"CRASH_AT": "2", "CRASH_RANK": "1"})
    assert run.returncode != 0  # torchrun reports the dead rank (and stops the other)
    before = _files(out)
    assert 1 <= len(before) < 7
    rerun = _batch(setup, out, ranks=2)
    assert rerun.returncode == 1, rerun.stderr[-2000:]
    assert f"{len(before)} already done" in rerun.stdout
    after = _files(out)
    assert len(after) == 7 and all(after[k] == v for k, v in before.items())
    done = [r["file"] for r in _records(out) if r["status"] == "done"]
    assert sorted(done) == sorted(after)
