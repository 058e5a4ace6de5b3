"""diffboost.batch: nothing finished is lost, nothing is made twice, with several writers and after
crashes; files get normal permissions; half-written files never look like images."""

import hashlib
import json
import multiprocessing
import os
import time

import numpy as np
import pytest
from PIL import Image

from diffboost.batch import (
    MANIFEST,
    BatchJob,
    FolderLock,
    InputError,
    load_manifest,
    make_jobs,
    read_prompts,
    remove_partial_files,
    run_batch,
    save_image,
    write_atomic,
)


def _jobs(prompts, seeds=(0, 1)):
    return make_jobs([{"prompt": p} for p in prompts], list(seeds), 4, size=32, guidance=None, plugins="none",
                     model="m", dtype="float32")


def _fake_generate(job, delay=0.0):
    """A deterministic image per job (what a seeded pipeline gives), optionally slow."""
    time.sleep(delay)
    rng = np.random.default_rng(int(hashlib.sha256(job.job_id.encode()).hexdigest()[:8], 16))
    return Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)), delay


def _writer(out, prompts, delay, queue):
    summary = run_batch(_jobs(prompts), out, lambda job: _fake_generate(job, delay), progress=False)
    queue.put(summary)


def _two_writers(out, prompts_a, prompts_b, delay=0.15):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(out, p, delay, queue)) for p in (prompts_a, prompts_b)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    return [queue.get(timeout=5) for _ in procs]


def test_two_writers_with_different_prompt_files_lose_no_manifest_row(tmp_path):
    out = tmp_path / "out"
    a, b = ["a red circle", "a blue square", "a green star"], ["a red square", "a blue circle", "a green circle"]
    summaries = _two_writers(out, a, b)
    assert sorted(s["made"] for s in summaries) == [6, 6]
    records = load_manifest(out)
    files = sorted(p.name for p in out.glob("*.png"))
    assert sorted(records) == files and len(files) == 12
    # a rerun of either finds everything done
    for prompts in (a, b):
        again = run_batch(_jobs(prompts), out, lambda job: pytest.fail("made again"), progress=False)
        assert (again["made"], again["skipped"]) == (0, 6)


def test_two_identical_runs_split_the_work(tmp_path):
    out = tmp_path / "out"
    prompts = ["a red circle", "a blue square", "a green star", "a red star"]
    summaries = _two_writers(out, prompts, prompts, delay=0.2)
    assert sum(s["made"] for s in summaries) == 8, summaries  # each image made once
    assert all(s["made"] > 0 for s in summaries), summaries  # and both runs worked
    assert len(load_manifest(out)) == 8 and len(list(out.glob("*.png"))) == 8


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_outputs_get_normal_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        out = tmp_path / "out"
        run_batch(_jobs(["a red circle"], seeds=[0]), out, _fake_generate, progress=False)
        save_image(_fake_generate(_jobs(["x"])[0])[0], tmp_path / "single.png")
    finally:
        os.umask(old)
    for path in [*out.glob("*.png"), out / MANIFEST, tmp_path / "single.png"]:
        assert path.stat().st_mode & 0o777 == mode, path


def test_a_truncated_image_with_a_manifest_row_is_made_again(tmp_path):
    out = tmp_path / "out"
    jobs = _jobs(["a red circle", "a blue square"])
    run_batch(jobs, out, _fake_generate, progress=False)
    victim = out / jobs[2].filename
    good = victim.read_bytes()
    victim.write_bytes(good[: len(good) // 2])  # a disk-full or a copy that stopped half-way
    made = []
    summary = run_batch(jobs, out, lambda job: (made.append(job.index), _fake_generate(job))[1], progress=False)
    assert made == [2] and (summary["made"], summary["skipped"]) == (1, 3)
    assert victim.read_bytes() == good
    record = load_manifest(out)[victim.name]
    assert record["bytes"] == len(good) and record["sha256"] == hashlib.sha256(good).hexdigest()


def test_manifests_from_before_checksums_are_checked_by_decoding(tmp_path):
    out = tmp_path / "out"
    jobs = _jobs(["a red circle"])
    run_batch(jobs, out, _fake_generate, progress=False)
    records = load_manifest(out)
    for r in records.values():  # an older diffboost wrote no size/checksum
        del r["bytes"], r["sha256"]
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    (out / jobs[1].filename).write_bytes((out / jobs[1].filename).read_bytes()[:40])
    made = []
    run_batch(jobs, out, lambda job: (made.append(job.index), _fake_generate(job))[1], progress=False)
    assert made == [1]


def test_a_killed_write_leaves_no_image_looking_file_and_is_cleaned_up(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    jobs = _jobs(["a red circle"], seeds=[0])

    def killed(tmp):
        open(tmp, "wb").write(b"\x89PNG half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(out / jobs[0].filename, killed)
    assert list(out.iterdir()) == []
    # SIGKILL gives no chance to clean up: such a file ends in .tmp, so image globs never see it
    stale = out / f".{jobs[0].filename}.k3x9_q.tmp"
    stale.write_bytes(b"\x89PNG half")
    stale_manifest = out / f".{MANIFEST}.ab12cd.tmp"
    stale_manifest.write_text("{")
    assert list(out.glob("*.png")) == [] and list(out.rglob("*.png")) == []
    run_batch(jobs, out, _fake_generate, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted([".diffboost.lock", MANIFEST, jobs[0].filename])


def _hold_claim(out, job_id, ready, done):
    lock = FolderLock(out)
    assert lock.claim(job_id)
    ready.set()
    done.wait(30)
    lock.close()


def test_a_live_writer_keeps_its_partial_file_and_its_job(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    job = _jobs(["a red circle"], seeds=[0])[0]
    ctx = multiprocessing.get_context("fork")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_claim, args=(out, job.job_id, ready, done))
    proc.start()
    try:
        assert ready.wait(30)
        partial = out / f".{job.filename}.live01.tmp"
        partial.write_bytes(b"being written")
        lock = FolderLock(out)
        try:
            assert remove_partial_files(out, lock) == 0 and partial.exists()
            assert not lock.claim(job.job_id)
        finally:
            lock.close()
        summary = run_batch([job], out, lambda j: pytest.fail("made twice"), progress=False)
        assert summary["busy"] == 1 and summary["made"] == 0
    finally:
        done.set()
        proc.join(30)
    # once the other run is gone (even killed: the kernel drops its locks) the job is free again
    assert run_batch([job], out, _fake_generate, progress=False)["made"] == 1
    assert not partial.exists()


def test_non_utf8_prompt_file_names_file_and_line(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_bytes(b"a red circle\n# fine\nun cercle \xe9 rouge\n")
    with pytest.raises(InputError, match=r"prompts.txt:3: not UTF-8 text \(byte 0xe9 at column 11\); save the prompt"):
        read_prompts(f)
    f.write_bytes("\ufeffa red circle\r\nà blue square\n".encode())
    assert [e["prompt"] for e in read_prompts(f)] == ["a red circle", "à blue square"]


def test_prompt_file_that_is_a_folder(tmp_path):
    with pytest.raises(InputError, match="is a folder; give a .txt, .jsonl or .csv file"):
        read_prompts(tmp_path)


def test_job_ids_do_not_depend_on_position():
    a = BatchJob(0, "x", 1, 4, 32, None, "none")
    b = BatchJob(7, "x", 1, 4, 32, None, "none")
    assert a.job_id == b.job_id and a.filename != b.filename


def test_the_manifest_is_parsed_again_only_when_it_changed(tmp_path, monkeypatch):
    import diffboost.batch as batch

    parses = []
    original = batch.load_manifest
    monkeypatch.setattr(batch, "load_manifest", lambda d: (parses.append(1), original(d))[1])
    out = tmp_path / "out"
    run_batch(_jobs(["a", "b", "c", "d"], seeds=[0, 1]), out, _fake_generate, progress=False)
    assert len(parses) == 1  # 8 images, one parse (none of the 8 manifest writes forces another)
    cache = batch.ManifestCache(out)
    first = cache.read()
    (out / MANIFEST).write_text("".join(json.dumps(r) + "\n" for r in list(first.values())[:3]))  # another run
    assert len(cache.read()) == 3 and len(parses) == 3


def test_size_multiple_follows_each_family():
    from diffboost.generation import size_multiple
    from factories import make_flux, make_sd, make_sd3, make_wan

    flux, sd, sd3, wan = make_flux(), make_sd(), make_sd3(), make_wan()
    assert size_multiple(flux) == flux.vae_scale_factor * 2  # 2 x 2 packing
    assert size_multiple(sd) == sd.vae_scale_factor  # a UNet takes every latent size
    assert size_multiple(sd3) == sd3.vae_scale_factor * sd3.transformer.config.patch_size
    assert size_multiple(wan) == wan.vae_scale_factor_spatial * 2  # patch (1, 2, 2)
