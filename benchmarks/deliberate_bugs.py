"""Re-apply the deliberate bugs of issue #19 and show which tests catch each one.

Each bug is applied to a scratch copy of the package (``runs/deliberate-bugs/<bug>/``; the checkout is
never touched), then the tests of the broken module run there. A bug is *caught* when at least one
test fails; the failing tests are listed. Before the test-suite rework every one of these passed
the whole suite (or was caught only by accident).

    python benchmarks/deliberate_bugs.py            # all four, about 5 minutes on 2 cores
    python benchmarks/deliberate_bugs.py --bug taylor-k

Writes ``benchmarks/results/deliberate-bugs.json``.
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

#: name -> (file, the exact original text, the bug, what it breaks, tests to run)
BUGS: dict[str, tuple[str, str, str, str, list[str]]] = {
    "taylor-k": (
        "diffboost/caches/taylor.py",
        "alpha=(k**i) / math.factorial(i)",
        "alpha=k / math.factorial(i)",
        "TaylorSeer forecast: k**i / i! replaced by k / i! (every order >= 2 forecast wrong for k >= 2)",
        ["tests/caches"],
    ),
    "block-cache-absolute": (
        "diffboost/caches/block_cache.py",
        "rel = _rel_l1(probe, st.ref, st.ref)",
        "rel = float((probe.float() - st.ref.float()).abs().mean())",
        "AdaptiveBlockCache: relative L1 change replaced by the absolute change",
        ["tests/caches"],
    ),
    "sada-sign": (
        "diffboost/samplers/sada.py",
        "return st.last_m <= 0.0",
        "return st.last_m >= 0.0",
        "SADA sign criterion flipped (m <= 0 -> m >= 0)",
        # the constructed-trajectory tests (seconds; flow Euler is Flux's and SD3's scheduler), not the
        # per-family pipeline cases (minutes)
        ["tests/samplers/test_sada.py", "-k", "sign_rule or decide_boundaries"],
    ),
    "tome-least-similar": (
        "diffboost/tokens/merging.py",
        "order = best.argsort(dim=-1, descending=True, stable=True)",
        "order = best.argsort(dim=-1, descending=False, stable=True)",
        "ToMe merges the least similar tokens",
        ["tests/tokens"],
    ),
}


def run_bug(name: str) -> dict:
    path, original, broken, what, tests = BUGS[name]
    work = ROOT / "runs" / "deliberate-bugs" / name
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for d in ("diffboost", "tests"):
        shutil.copytree(ROOT / d, work / d, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(ROOT / "pyproject.toml", work / "pyproject.toml")
    if (ROOT / "assets").exists():
        (work / "assets").symlink_to(ROOT / "assets")
    source = (work / path).read_text()
    if source.count(original) != 1:
        raise SystemExit(f"{name}: expected the text {original!r} exactly once in {path}; the code changed, update BUGS")
    (work / path).write_text(source.replace(original, broken))
    env = dict(os.environ, PYTHONPATH=str(work))  # the scratch package shadows an installed one
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--tb=no", "-rf", *tests],
        cwd=work, env=env, capture_output=True, text=True,
    )
    failed = sorted(set(re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.M)))
    tail = [l for l in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed)", l)]
    # the scratch copy must really be the one imported: a sanity run of the import inside it
    probe = subprocess.run([sys.executable, "-c", "import diffboost; print(diffboost.__file__)"], cwd=work, env=env, capture_output=True, text=True)
    assert str(work) in probe.stdout, f"the scratch package was not imported: {probe.stdout} {probe.stderr}"
    return {
        "bug": name,
        "what": what,
        "file": path,
        "change": [original, broken],
        "tests_run": tests,
        "caught": bool(failed),
        "failed_tests": failed,
        "summary": tail[-1] if tail else proc.stdout[-500:],
        "wall_s": round(time.monotonic() - start, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bug", action="append", choices=sorted(BUGS), help="default: all")
    args = parser.parse_args(argv)
    rows = []
    for name in args.bug or list(BUGS):
        row = run_bug(name)
        rows.append(row)
        print(f"{name}: {'CAUGHT' if row['caught'] else 'NOT CAUGHT'} by {len(row['failed_tests'])} tests ({row['summary']})", flush=True)
        for t in row["failed_tests"][:8]:
            print(f"    {t}")
    out = ROOT / "benchmarks" / "results" / "deliberate-bugs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else {}
    previous.update({r["bug"]: r for r in rows})
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(previous, indent=1) + "\n")
    tmp.replace(out)
    return 0 if all(r["caught"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
