"""Run the atheris fuzz targets for a time budget.

    python -m tests.fuzz.run --all --seconds 60          # every target, 60 s each
    python -m tests.fuzz.run --target kho-v1 --seconds 300
    python -m tests.fuzz.run --list

Each target runs in its own process (libFuzzer owns the process it fuzzes in), with kho's
modules instrumented for coverage, a per-input time limit (``--timeout``, a hang is a
crash) and a memory limit (``--rss-limit-mb``, unbounded allocation is a crash).  The
working corpus lives in ``--corpus DIR/<target>`` (default: a ``kho-fuzz`` folder in the
system's temporary directory), seeded from :mod:`tests.fuzz.corpus` when empty, and keeps
growing from run to run.  A crashing input is written to ``tests/fuzz/crashes/<target>/``:
commit it, fix the decoder, and ``tests/test_fuzz_regressions.py`` replays it forever.

Prints one line per target (executions, corpus size, crashes) and exits 1 if any target
crashed; exits 0 with a note when atheris is not installed and ``--skip-missing`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CRASHES = HERE / "crashes"
DEFAULT_CORPUS = Path(tempfile.gettempdir()) / "kho-fuzz"
#: Where libFuzzer's final statistics give the number of inputs executed.
_EXECUTED = re.compile(r"stat::number_of_executed_units:\s*(\d+)")
_DONE = re.compile(r"Done (\d+) runs")


def _worker(target: str, seconds: int, corpus: Path, artifacts: Path, timeout: int, rss_limit_mb: int) -> None:
    """Fuzz ``target`` in this process (never returns: libFuzzer exits)."""
    import atheris

    with atheris.instrument_imports(include=["kho"]):
        from tests.fuzz.targets import TARGETS
    target_fn = TARGETS[target]
    artifacts.mkdir(parents=True, exist_ok=True)
    argv = [sys.argv[0], str(corpus), f"-max_total_time={seconds}", f"-max_len={target_fn.max_len}",
            f"-timeout={timeout}", f"-rss_limit_mb={rss_limit_mb}", f"-artifact_prefix={artifacts}/",
            "-print_final_stats=1"]
    atheris.Setup(argv, target_fn.run)
    atheris.Fuzz()


def run_target(target: str, seconds: int, corpus_root: Path, timeout: int, rss_limit_mb: int) -> dict:
    """Fuzz one target in a child process; its executions, corpus size, crash files and log tail."""
    from tests.fuzz.corpus import write_corpus

    corpus = corpus_root / target
    if not corpus.is_dir() or not any(corpus.iterdir()):
        write_corpus(corpus_root, [target])
    artifacts = CRASHES / target
    before = set(artifacts.iterdir()) if artifacts.is_dir() else set()
    cmd = [sys.executable, "-m", "tests.fuzz.run", "--worker", target, "--seconds", str(seconds),
           "--corpus", str(corpus_root), "--timeout", str(timeout), "--rss-limit-mb", str(rss_limit_mb)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    elapsed = time.monotonic() - start
    log = proc.stderr + proc.stdout
    match = _EXECUTED.search(log) or _DONE.search(log)
    after = set(artifacts.iterdir()) if artifacts.is_dir() else set()
    new = sorted(str(p.relative_to(REPO)) for p in after - before)
    return {
        "target": target, "seconds": round(elapsed, 1), "executions": int(match.group(1)) if match else None,
        "corpus": sum(1 for _ in corpus.iterdir()), "exit": proc.returncode, "crashes": new,
        "log_tail": "\n".join(log.strip().splitlines()[-25:]) if proc.returncode else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fuzz kho's decoders with atheris for a time budget.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--target", action="append", help="a target to fuzz (repeatable)")
    which.add_argument("--all", action="store_true", help="every target, one after the other")
    which.add_argument("--list", action="store_true", help="list the targets")
    which.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=int, default=60, help="budget per target (default 60)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help=f"corpus root (default {DEFAULT_CORPUS})")
    parser.add_argument("--timeout", type=int, default=20, help="seconds one input may take before it counts as a hang (default 20)")
    parser.add_argument("--rss-limit-mb", type=int, default=2048, help="memory limit of a fuzzing process (default 2048)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--skip-missing", action="store_true", help="exit 0 when atheris is not installed")
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker, args.seconds, args.corpus / args.worker, CRASHES / args.worker, args.timeout, args.rss_limit_mb)
        return 0
    from tests.fuzz.targets import TARGETS

    if args.list:
        for name, target in TARGETS.items():
            print(f"{name:<15} max input {target.max_len:,} bytes")
        return 0
    try:
        import atheris  # noqa: F401
    except ImportError:
        print("atheris is not installed (pip install -e '.[fuzz]')", file=sys.stderr)
        return 0 if args.skip_missing else 2
    names = list(TARGETS) if args.all else args.target
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; --list shows them")
    results = []
    for name in names:
        result = run_target(name, args.seconds, args.corpus, args.timeout, args.rss_limit_mb)
        results.append(result)
        if not args.json:
            execs = "?" if result["executions"] is None else f"{result['executions']:,}"
            status = "ok" if result["exit"] == 0 else f"CRASH (exit {result['exit']}) {' '.join(result['crashes'])}"
            print(f"{name:<15} {execs:>10} executions in {result['seconds']:>6.1f} s, corpus {result['corpus']:>5}  {status}", flush=True)
            if result["exit"]:
                print(result["log_tail"], flush=True)
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if any(r["exit"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
