"""Long mutation-fuzzing run of the checkpoint readers through the real CLI (the CI test runs a short share).

Usage (from the repository root)::

    python benchmarks/fuzz_long.py --iterations 20000            # ~20000 mutants per container
    python benchmarks/fuzz_long.py --iterations 500 --seed 7000  # another slice of seeds
    python benchmarks/fuzz_long.py --only dcp --limit 5

Each iteration mutates a valid torch zip, legacy torch file, safetensors file and DCP folder (bit flips,
truncations, random byte runs in the pickle, swapped or duplicated zip entries, swapped central-directory
offsets), then runs ``bnaudit inspect --security MUTANT`` and ``bnaudit compare VALID MUTANT`` in-process.
Every run must end with exit 0, 1 or 2 within ``--limit`` seconds; anything else (exit 3, a hang) is printed
with its seed, base and mutation, which reproduce it exactly: ``tests/test_fuzz.py`` holds the engine
(``make_corpus``, ``mutate_copy``, ``fuzz``). The exit status is 1 when a failure was found.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.test_fuzz import fuzz, make_corpus  # the engine lives with the CI test; root is on sys.path


def main() -> int:
    """Run the fuzzer; print failures (deduplicated by message) and a summary."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=2000, help="mutants per container (default 2000)")
    parser.add_argument("--seed", type=int, default=100_000, help="first seed (CI uses 0..249)")
    parser.add_argument("--limit", type=float, default=10.0, help="seconds allowed per run (default 10)")
    parser.add_argument(
        "--only", choices=["zip", "legacy", "safetensors", "dcp"], action="append", help="containers to fuzz"
    )
    args = parser.parse_args()
    logging.disable(logging.CRITICAL)
    started = time.monotonic()
    seen: set[str] = set()
    failures = 0
    with tempfile.TemporaryDirectory(prefix="bnaudit-fuzz-") as tmp:
        corpus = make_corpus(Path(tmp) / "corpus")
        if args.only:
            corpus = {k: v for k, v in corpus.items() if k in args.only}
        work = Path(tmp) / "work"
        work.mkdir()
        for failure in fuzz(corpus, work, args.iterations, seed=args.seed, limit_s=args.limit):
            failures += 1
            key = f"{failure.code}:{failure.stderr.strip()[-200:]}"
            if key not in seen:
                seen.add(key)
                print(failure, flush=True)
    runs = args.iterations * len(corpus) * 2
    print(
        f"{runs} runs over {len(corpus)} containers in {time.monotonic() - started:.0f} s: "
        f"{failures} failure(s), {len(seen)} distinct"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
