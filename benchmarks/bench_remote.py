"""Benchmark ``bnaudit compare`` / ``average`` over HTTP and S3 against downloading the checkpoints first.

Creates per-rank checkpoints with ``bench_compare.py``'s shape (120 conv+BN layers of 512 channels, about
460 MB per rank by default), serves them from a range-capable HTTP server on 127.0.0.1 that counts the
bytes it sends (tests/remote/servers.py) and from moto's S3 server, then times as whole processes:

- ``bnaudit compare`` on the URLs (HTTP and S3), against downloading every rank (``urllib``), against
  downloading then ``torch.load``-ing every rank;
- ``bnaudit average`` from S3 to S3 (``-o s3://...``), against downloading the ranks, averaging the local
  copies and uploading the result.

Bytes over HTTP are the server's count; over S3 (moto counts nothing) they are bnaudit's own count from the
JSON report. Usage:
    python benchmarks/bench_remote.py                            # 4 ranks x ~460 MB (needs ~2 GB of disk)
    python benchmarks/bench_remote.py --ranks 256 --layers 8 --channels 64     # many small ranks
    python benchmarks/bench_remote.py --smoke                    # tiny, for CI
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import bnaudit_argv, python_env, run_process

from tests.remote.servers import http_server, moto_server, s3_env

DOWNLOAD = """
import sys, shutil, urllib.request
for i, url in enumerate(sys.argv[2:]):
    with urllib.request.urlopen(url) as r, open(f"{sys.argv[1]}/rank{i}.pt", "wb") as f:
        shutil.copyfileobj(r, f, 1 << 20)
"""
LOAD = """
import sys, glob, torch
for path in sorted(glob.glob(sys.argv[1] + "/rank*.pt")):
    sd = torch.load(path, map_location="cpu", weights_only=True)
    total = sum(float(v.double().sum()) for k, v in sd["model"].items() if k.endswith("running_var"))
"""
S3_ROUNDTRIP = """
import sys, subprocess, s3fs
fs, tmp = s3fs.S3FileSystem(), sys.argv[1]
paths = sorted(fs.glob("bucket/run/ckpt_rank*.pt"))
for p in paths:
    fs.get(p, f"{tmp}/{p.rsplit('/', 1)[1]}")
subprocess.run([sys.executable, "-m", "bnaudit", "average", f"{tmp}/ckpt_rank*.pt", "-o", f"{tmp}/fixed.pt",
                "--force"], check=True, capture_output=True)
fs.put(f"{tmp}/fixed.pt", "bucket/out/roundtrip.pt")
"""
UPLOAD = """
import sys, s3fs
fs = s3fs.S3FileSystem(); fs.mkdir("bucket")
for p in sys.argv[1:]:
    fs.put(p, "bucket/run/" + p.rsplit("/", 1)[1])
"""


def _make(folder: Path, args: argparse.Namespace) -> list[Path]:
    """The ranks, made by bench_compare.make_rank in one child process (torch is imported once)."""
    paths = [folder / f"ckpt_rank{r}.pt" for r in range(args.ranks)]
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from bench_compare import make_rank\n"
        "for r, p in enumerate(sys.argv[4:]): make_rank(p, int(sys.argv[2]), int(sys.argv[3]), r)\n"
    )
    here = str(Path(__file__).resolve().parent)
    sizes = [str(args.layers), str(args.channels)]
    subprocess.run([sys.executable, "-c", code, here, *sizes, *map(str, paths)], check=True)
    return paths


def _timed(name: str, argv: list[str], env: dict[str, str], repeats: int) -> float:
    runs = [run_process(argv, env) for _ in range(repeats)]
    if runs[-1].returncode not in (0, 1):
        sys.exit(f"{name} exited {runs[-1].returncode}")
    return statistics.median(r.seconds for r in runs)


def _compare_over_http(paths: list[Path], args: argparse.Namespace, env: dict[str, str], tmp: Path) -> None:
    total = sum(p.stat().st_size for p in paths)
    with http_server(paths[0].parent) as (base, served):
        urls = [f"{base}/{p.name}" for p in paths]
        sides = {
            "bnaudit compare over HTTP": bnaudit_argv(
                "compare", f"{base}/ckpt_rank*.pt", "--fail-on", "never"
            ),
            "  the same, --jobs 8": bnaudit_argv(
                "compare", f"{base}/ckpt_rank*.pt", "--fail-on", "never", "--jobs", "8"
            ),
            "download every rank (urllib)": [sys.executable, "-c", DOWNLOAD, str(tmp), *urls],
        }
        rows = []
        for name, argv in sides.items():
            served.bytes.clear()
            served.requests.clear()
            seconds = _timed(name, argv, env, args.repeats)
            sent = sum(served.bytes.values()) / args.repeats
            rows.append((name, seconds, sent, sum(served.requests.values()) / args.repeats))
        load = _timed("torch.load", [sys.executable, "-c", LOAD, str(tmp)], env, args.repeats)
        rows.append(("  + torch.load of the downloads", rows[2][1] + load, rows[2][2], rows[2][3]))
    print(
        f"{len(paths)} ranks x {total / len(paths) / 1e6:.1f} MB over HTTP (127.0.0.1), {args.repeats} runs"
    )
    print(f"{'side':34} {'median s':>9} {'bytes/rank':>12} {'% of file':>10} {'requests/rank':>14}")
    for name, seconds, sent, requests in rows:
        per = sent / len(paths)
        print(f"{name:34} {seconds:9.2f} {per:12.0f} {100 * per * len(paths) / total:9.3f}% "
              f"{requests / len(paths):14.1f}")  # fmt: skip
    print(f"ratio compare over HTTP / download: {rows[0][1] / rows[2][1]:.3f}; "
          f"/ download + torch.load: {rows[0][1] / rows[3][1]:.3f}; with --jobs 8: "
          f"{rows[1][1] / rows[2][1]:.3f} / {rows[1][1] / rows[3][1]:.3f}")  # fmt: skip


def _over_s3(paths: list[Path], args: argparse.Namespace, env: dict[str, str], tmp: Path) -> None:
    with moto_server() as endpoint:
        s3 = {**s3_env(endpoint), "PYTHONPATH": env["PYTHONPATH"], "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", UPLOAD, *map(str, paths)], check=True, env=s3)
        pattern = "s3://bucket/run/ckpt_rank*.pt"
        done = subprocess.run(
            bnaudit_argv("compare", pattern, "--format", "json", "--fail-on", "never"),
            capture_output=True, text=True, env=s3, check=False,
        )  # fmt: skip
        reads = [i["transfer"]["bytes_read"] for i in json.loads(done.stdout)["inputs"]]
        compare = _timed(
            "compare s3", bnaudit_argv("compare", pattern, "--fail-on", "never"), s3, args.repeats
        )
        average = bnaudit_argv("average", pattern, "-o", "s3://bucket/out/fixed.pt", "--force")
        ours = _timed("average s3 -> s3", average, s3, args.repeats)
        theirs = _timed("roundtrip", [sys.executable, "-c", S3_ROUNDTRIP, str(tmp)], s3, args.repeats)
    size = paths[0].stat().st_size
    print(f"S3 (moto on 127.0.0.1): compare {compare:.2f} s, {statistics.median(reads):.0f} bytes/rank "
          f"({100 * statistics.median(reads) / size:.3f}% of the file, bnaudit's count)")  # fmt: skip
    print(f"average s3 -> s3: {ours:.2f} s; download + average + upload: {theirs:.2f} s; "
          f"ratio {ours / theirs:.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=120)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-s3", action="store_true", help="only the HTTP part")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run (for CI)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.ranks, args.layers, args.channels, args.repeats = 2, 4, 16, 1
    env = python_env()
    with tempfile.TemporaryDirectory(dir=args.workdir) as made, tempfile.TemporaryDirectory() as scratch:
        paths = _make(Path(made), args)
        _compare_over_http(paths, args, env, Path(scratch))
        if not args.no_s3:
            _over_s3(paths, args, env, Path(scratch))


if __name__ == "__main__":
    main()
