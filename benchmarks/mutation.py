"""Mutation testing of the method cores with mutmut: does the test suite notice a broken method?

For each module below, mutmut rewrites it into many *mutants* (one small change each: ``<`` for
``<=``, ``+`` for ``-``, a constant changed, a condition negated, ...) and runs the tests that cover
the mutated function against each one. A mutant is *killed* when a test fails. The score of a module
is killed / (every mutant that was run): a mutant that no test reaches counts as a survivor.

Each module runs in its own scratch copy (``runs/mutation/<module>/``, with the module's own mutmut
configuration and only its own tests selected), so runs never touch the checkout and can be resumed:
run the same command again and mutmut only runs the mutants it has no result for yet (``--fresh``
starts over, and is what re-measures a module after tests were added: mutmut keeps the result of an
unchanged mutant). Not part of CI.

    python benchmarks/mutation.py                         # every module
    python benchmarks/mutation.py --module caches/taylor.py --module caches/block_cache.py
    python benchmarks/mutation.py --list                  # the modules and their tests

Writes ``benchmarks/results/mutation/<module>.json`` (counts, score, wall time, the command) and
``<module>-survivors.md`` (each surviving mutant's diff, for review: an equivalent mutant or a
missing test). The reviewed survivors and the scores are in ``benchmarks/TESTING.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: module (under diffboost/) -> the tests that pin it (pytest arguments: files relative to the repo
#: root, optionally "-k" and an expression)
MODULES: dict[str, list[str]] = {
    "caches/taylor.py": ["tests/caches/test_taylor.py"],
    "caches/taylorseer.py": ["tests/caches/test_taylorseer.py", "tests/caches/test_configs.py"],
    "caches/block_cache.py": ["tests/caches/test_block_cache.py", "tests/caches/test_configs.py"],
    "caches/easycache.py": ["tests/caches/test_easycache.py"],
    # the constructed-trajectory and pure tests (seconds); the per-family pipeline cases (minutes) also
    # run in the suite but would make every surviving mutant cost minutes here
    "samplers/sada.py": [
        "tests/samplers/test_sada.py",
        "-k",
        "not (never_firing or skipping_in_range or test_curvature_criterion or fixed_schedule or calls_steps"
        " or stacks_with or flux_true_cfg or zero_terminal)",
    ],
    "samplers/sada_tokens.py": [
        "tests/samplers/test_sada_tokens.py",
        "-k",
        "not (bit_identical or blocks_see_fewer or batch2_cfg or step_after_a_skip)",
    ],
    "samplers/bottleneck.py": [
        "tests/samplers/test_bottleneck.py",
        "-k",
        "not (bit_identical or multi_stage_keeps or batch_of_two or stacks_with or sizes_not_divisible"
        " or flux_true_cfg or wan_two_experts)",
    ],
    "tokens/merging.py": [
        "tests/tokens/test_merging.py",
        "-k",
        "not (bit_identical or changes_output or attention_sees or max_downsample_1 or resolution_changes"
        " or stacks_with or pixart)",
    ],
    "plugins/runtime.py": ["tests/plugins/test_runtime.py"],
    "prompt_files.py": ["tests/test_prompt_files.py"],
    "plugins/calibrate.py": ["tests/plugins/test_calibrate.py"],
    "kernels/quantized.py": ["tests/kernels/test_quantized.py"],
    "kernels/sparse.py": ["tests/kernels/test_sparse.py", "-k", "not flex"],
    "plugins/base.py": ["tests/plugins/test_base.py", "tests/caches/test_configs.py", "tests/plugins/test_stats.py"],
    "plugins/stacking.py": ["tests/plugins/test_stacking.py"],
    # presets are data now (diffboost/presets/*.toml, pinned by tests/plugins/test_presets.py); the code
    # that reads and checks them is the stack-file module
    "plugins/stacks.py": ["tests/plugins/test_stacks.py"],
    "distill/reflow.py": ["tests/distill/test_reflow.py", "tests/distill/test_trainer.py", "-k",
                          "not (unet or bad_input or validated)"],
    "distill/dmd.py": ["tests/distill/test_dmd.py"],
    "samplers/onestep.py": ["tests/samplers/test_onestep.py"],
    "vlm/hiprune.py": ["tests/vlm/test_hiprune.py", "tests/vlm/test_vlm_runtime.py", "-k", "hiprune or HiPrune"],
    "vlm/hired.py": ["tests/vlm/test_hired.py", "tests/vlm/test_vlm_runtime.py", "-k", "hired or HiRED"],
    "vlm/visionzip.py": ["tests/vlm/test_visionzip.py", "tests/vlm/test_vlm_runtime.py", "-k", "visionzip or VisionZip"],
    "vlm/downsample.py": ["tests/vlm/test_downsample.py", "tests/vlm/test_vlm_runtime.py", "-k", "downsample or Downsample"],
    "vlm/fastv.py": ["tests/vlm/test_fastv.py", "tests/vlm/test_vlm_runtime.py", "-k", "fastv or FastV"],
    "vlm/runtime.py": ["tests/vlm/test_vlm_runtime.py", "tests/vlm/test_adapter.py"],
}

STATUSES = ("killed", "survived", "no tests", "timeout", "suspicious", "skipped", "segfault", "not checked", "caught by type check")


def slug(module: str) -> str:
    return module.removesuffix(".py").replace("/", ".")


def prepare(module: str, tests: list[str], work: Path, fresh: bool) -> None:
    """A scratch copy of the package and the tests, with a mutmut configuration for this module only."""
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    for name in ("diffboost", "reference/diffboost_reference", "tests"):
        target = work / Path(name).name  # the scratch copy imports every package from its root
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # the tests (or the module) may have changed since the last run: make mutmut record afresh which
    # tests reach which function (earlier results of unchanged mutants are kept)
    (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    assets = work / "assets"
    if not assets.exists() and (ROOT / "assets").exists():
        assets.symlink_to(ROOT / "assets")
    # the fork server's warm-up (see benchmarks/mutation_warmup.py), importable from the scratch root
    shutil.copy2(ROOT / "benchmarks" / "mutation_warmup.py", work / "mutation_warmup.py")
    missing = [t for t in tests if t.startswith("tests/") and not (ROOT / t.split("::")[0]).exists()]
    if missing:
        raise SystemExit(f"{module}: test files missing: {missing}")
    toml_list = lambda items: "[" + ", ".join(json.dumps(i) for i in items) + "]"  # noqa: E731
    (work / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["diffboost"]\n'
        'also_copy = ["mutation_warmup.py"]\n'
        f"only_mutate = {toml_list(['diffboost/' + module])}\n"
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}\n"
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:unraisableexception", "-p", "mutation_warmup",'
        ' "-q", "-W", "ignore::DeprecationWarning"]\n'
        # error messages and log lines are not the method: their statements are not mutated (the
        # conditions that raise or log are)
        "do_not_mutate_patterns = [\"^\\\\s*raise \", \"^\\\\s*logger\\\\.\"]\n"
        'process_isolation = "forkserver"\n'
        "timeout_multiplier = 5.0\n"
        "timeout_constant = 30.0\n"
        "\n[tool.pytest.ini_options]\n"
        'testpaths = ["tests"]\n'
        'markers = ["gpu: needs a CUDA device", "slow: long-running test"]\n'
    )


def results(work: Path, env: dict[str, str]) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "mutmut", "results", "--all", "true"],
        cwd=work, env=env, capture_output=True, text=True, check=True,
    ).stdout
    status = {}
    for line in out.splitlines():
        m = re.match(r"\s*(\S+): (.+)$", line)
        if m and m.group(2).strip() in STATUSES:
            status[m.group(1)] = m.group(2).strip()
    return status


def show(work: Path, env: dict[str, str], name: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", name], cwd=work, env=env, capture_output=True, text=True).stdout
    return "\n".join(l for l in out.splitlines() if l[:1] in "+-@" and not l.startswith(("+++", "---")))


def run_module(module: str, args: argparse.Namespace) -> dict:
    tests = MODULES[module]
    work = ROOT / "runs" / "mutation" / slug(module)
    env = dict(os.environ)
    if args.collect:  # an interrupted run: report what it checked so far
        return summarise(module, tests, work, env, 0.0, "interrupted: the mutants checked so far")
    prepare(module, tests, work, args.fresh)
    # one thread per worker: mutmut forks its workers, and OpenMP thread pools do not survive a fork
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)]
    start = time.monotonic()
    with open(work / "mutmut-run.log", "w") as log:
        proc = subprocess.run(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    wall = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"{module}: mutmut run failed (exit {proc.returncode}); see {work / 'mutmut-run.log'}")
    this_run = "every mutant without a result"
    return summarise(module, tests, work, env, wall, this_run)


def summarise(module: str, tests: list[str], work: Path, env: dict[str, str], wall: float, this_run: str) -> dict:
    status = results(work, env)
    counts = {s: sum(v == s for v in status.values()) for s in STATUSES if any(v == s for v in status.values())}
    considered = len(status) - counts.get("skipped", 0) - counts.get("not checked", 0)
    detected = counts.get("killed", 0) + counts.get("timeout", 0) + counts.get("caught by type check", 0) + counts.get("segfault", 0)
    survivors = sorted(n for n, s in status.items() if s in ("survived", "no tests", "suspicious"))
    summary = {
        "module": f"diffboost/{module}",
        "tests": tests,
        "mutants": len(status),
        "counts": counts,
        "score": round(detected / considered, 4) if considered else None,
        "wall_s_this_run": round(wall, 1),
        "this_run": this_run,
        "command": f"python benchmarks/mutation.py --module {module}",
        "survivors": survivors,
    }
    out = ROOT / "benchmarks" / "results" / "mutation"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{slug(module)}.json").write_text(json.dumps(summary, indent=1) + "\n")
    lines = [f"# Surviving mutants of diffboost/{module}", "", f"{len(survivors)} of {len(status)} mutants; tests: {', '.join(tests)}", ""]
    for name in survivors:
        lines += [f"## {name} ({status[name]})", "", "```diff", show(work, env, name), "```", ""]
    (out / f"{slug(module)}-survivors.md").write_text("\n".join(lines))
    return summary


def table() -> str:
    """Markdown table of every recorded module result (benchmarks/results/mutation/*.json)."""
    rows = ["| module | mutants | killed | survived | no tests | timeout | score | tests (selection) |", "|---|---:|---:|---:|---:|---:|---:|---|"]
    for module in MODULES:
        path = ROOT / "benchmarks" / "results" / "mutation" / f"{slug(module)}.json"
        if not path.exists():
            rows.append(f"| diffboost/{module} | not run | | | | | | |")
            continue
        r = json.loads(path.read_text())
        c = r["counts"]
        sel = " ".join(r["tests"]).replace("|", "\\|")
        partial = f" ({c['not checked']} not checked yet)" if c.get("not checked") else ""
        rows.append(
            f"| {r['module']}{partial} | {r['mutants']} | {c.get('killed', 0)} | {c.get('survived', 0)} | {c.get('no tests', 0)} | "
            f"{c.get('timeout', 0)} | {r['score']:.1%} | {sel} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--module", action="append", choices=sorted(MODULES), help="module under diffboost/ (repeatable; default: all)")
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant workers (default 2, one per core)")
    parser.add_argument("--fresh", action="store_true", help="discard earlier results of these modules and start over")
    parser.add_argument("--collect", action="store_true", help="only collect the results of an interrupted run (not-checked mutants excluded)")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the recorded results, then exit")
    parser.add_argument("--list", action="store_true", help="list the modules and their tests, then exit")
    args = parser.parse_args(argv)
    if args.max_children < 1:
        parser.error(f"--max-children must be >= 1, got {args.max_children}")
    if args.table:
        print(table())
        return 0
    if args.list:
        for module, tests in MODULES.items():
            print(f"diffboost/{module}: {' '.join(tests)}")
        return 0
    try:
        import mutmut  # noqa: F401
    except ImportError:
        parser.error("mutmut is not installed: pip install 'mutmut==3.8.1'")
    for module in args.module or list(MODULES):
        s = run_module(module, args)
        print(f"{s['module']}: {s['score']:.1%} killed ({s['counts']}), {s['wall_s_this_run']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
