"""Benchmark ``bnaudit compare`` / ``average`` over HTTP and S3 against downloading the checkpoints first.

Creates per-rank checkpoints — ``bench_compare.py``'s shape (``--layers`` conv+BN layers of ``--channels``
channels; 120 x 512 by default, about 463 MB per rank) or a ResNet-18's or ResNet-50's state dict
(``--model resnet18``: 20 BatchNorm layers, 46.8 MB per rank) — serves them from a range-capable HTTP
server on 127.0.0.1 that counts the bytes it sends, and from moto's S3 server run in this process behind a
layer that counts the same (tests/remote/servers.py), then times as whole processes:

- ``bnaudit compare`` on the URLs (HTTP and S3), against downloading every rank (``urllib``), against
  downloading then ``torch.load``-ing every rank; over HTTP also with ``--latency-ms`` (20 ms) added by
  the server to every request, as a real store's round trip would be (loopback has none);
- ``bnaudit average`` from S3 to S3 (``-o s3://...``), against downloading the ranks, averaging the local
  copies and uploading the result.

Bytes and requests per rank are the servers' counts. moto reads the whole object for every ranged GET (it
slices the full body), so its times grow with the file size times the requests: ``--s3-ranks`` runs the
S3 part on the first ranks only. Usage:
    python benchmarks/bench_remote.py                                   # 4 ranks x ~463 MB (~2 GB of disk)
    python benchmarks/bench_remote.py --ranks 256 --model resnet18      # 256 ranks x 46.8 MB (~12 GB)
    python benchmarks/bench_remote.py --ranks 256 --layers 8 --channels 64     # many tiny ranks (0.55 MB)
    python benchmarks/bench_remote.py --smoke                           # tiny, for CI
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import bnaudit_argv, python_env, run_process

from tests.remote.servers import counting_s3_server, http_server, s3_env

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
paths = sorted(fs.glob("bucket/run/ckpt_rank*.pt"), key=lambda p: int(p.rsplit("rank", 1)[1][:-3]))
for p in paths[: int(sys.argv[2])]:
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


RESNET = """
import sys, torch
from collections import OrderedDict
STAGES = {"resnet18": ("basic", [2, 2, 2, 2]), "resnet50": ("bottleneck", [3, 4, 6, 3])}
def bn(sd, name, c, gen):
    sd[name + ".weight"], sd[name + ".bias"] = torch.ones(c), torch.zeros(c)
    sd[name + ".running_mean"] = torch.randn(c, generator=gen) * 0.1
    sd[name + ".running_var"] = 1 + torch.rand(c, generator=gen) * 0.1
    sd[name + ".num_batches_tracked"] = torch.tensor(1000)
def state(model, rank, weights):
    kind, blocks = STAGES[model]
    gen, sd = torch.Generator().manual_seed(1000 + rank), OrderedDict()
    def conv(name, o, i, k):
        w = weights.get(name)
        sd[name] = weights[name] = w if w is not None else torch.randn(o, i, k, k) * 0.01
    conv("conv1.weight", 64, 3, 7); bn(sd, "bn1", 64, gen)
    inp, grow = 64, 1 if kind == "basic" else 4
    for s, n in enumerate(blocks):
        width = 64 << s
        for b in range(n):
            p = f"layer{s + 1}.{b}"
            shapes = ([(width, inp, 3), (width, width, 3)] if kind == "basic"
                      else [(width, inp, 1), (width, width, 3), (width * 4, width, 1)])
            for j, (o, i, k) in enumerate(shapes):
                conv(f"{p}.conv{j + 1}.weight", o, i, k); bn(sd, f"{p}.bn{j + 1}", o, gen)
            if b == 0 and (s > 0 or grow > 1):
                conv(f"{p}.downsample.0.weight", width * grow, inp, 1)
                bn(sd, f"{p}.downsample.1", width * grow, gen)
            inp = width * grow
    sd["fc.weight"] = weights.setdefault("fc", torch.randn(1000, inp) * 0.01)
    sd["fc.bias"] = torch.zeros(1000)
    return sd
weights = {}
for r, p in enumerate(sys.argv[2:]):
    torch.save({"model": state(sys.argv[1], r, weights), "epoch": 7}, p)
"""


def _make(folder: Path, args: argparse.Namespace) -> list[Path]:
    """The ranks, made in one child process (torch is imported once)."""
    paths = [folder / f"ckpt_rank{r}.pt" for r in range(args.ranks)]
    if args.model != "grid":
        subprocess.run([sys.executable, "-c", RESNET, args.model, *map(str, paths)], check=True)
        return paths
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
    late = f"  the same, {args.latency_ms:g} ms per request"
    with http_server(paths[0].parent) as (base, served):
        urls = [f"{base}/{p.name}" for p in paths]
        compare = bnaudit_argv("compare", f"{base}/ckpt_rank*.pt", "--fail-on", "never")
        download = [sys.executable, "-c", DOWNLOAD, str(tmp), *urls]
        sides = {  # name: (argv, the server's added latency per request)
            "bnaudit compare over HTTP": (compare, 0.0),
            "  the same, --jobs 8": ([*compare, "--jobs", "8"], 0.0),
            late: (compare, args.latency_ms / 1000),
            late + ", --jobs 8": ([*compare, "--jobs", "8"], args.latency_ms / 1000),
            "download every rank (urllib)": (download, 0.0),
            late + " ": (download, args.latency_ms / 1000),
        }
        rows = {}
        for name, (argv, delay) in sides.items():
            served.bytes.clear()
            served.requests.clear()
            served.delay_s = delay
            seconds = _timed(name, argv, env, args.repeats)
            sent = sum(served.bytes[p.name] for p in paths) / args.repeats  # the ranks, not the listing
            rows[name] = (seconds, sent, sum(served.requests[p.name] for p in paths) / args.repeats)
        load = _timed("torch.load", [sys.executable, "-c", LOAD, str(tmp)], env, args.repeats)
        down = rows["download every rank (urllib)"]
        rows["  + torch.load of the downloads"] = (down[0] + load, down[1], down[2])
    print(
        f"{len(paths)} ranks x {total / len(paths) / 1e6:.2f} MB over HTTP (127.0.0.1), {args.repeats} runs"
    )
    print(f"{'side':34} {'median s':>9} {'bytes/rank':>12} {'% of file':>10} {'requests/rank':>14}")
    for name, (seconds, sent, requests) in rows.items():
        per = sent / len(paths)
        print(f"{name:34} {seconds:9.2f} {per:12.0f} {100 * per * len(paths) / total:9.3f}% "
              f"{requests / len(paths):14.1f}")  # fmt: skip
    ours, jobs, dl = rows["bnaudit compare over HTTP"][0], rows["  the same, --jobs 8"][0], down[0]
    full = rows["  + torch.load of the downloads"][0]
    print(f"ratio compare over HTTP / download: {ours / dl:.3f}; / download + torch.load: {ours / full:.3f}; "
          f"with --jobs 8: {jobs / dl:.3f} / {jobs / full:.3f}; with {args.latency_ms:g} ms per request: "
          f"{rows[late][0] / rows[late + ' '][0]:.3f} (of the download with the same latency)")  # fmt: skip


def _over_s3(paths: list[Path], args: argparse.Namespace, env: dict[str, str], tmp: Path) -> None:
    paths = paths[: args.s3_ranks or len(paths)]
    with counting_s3_server() as (endpoint, served):
        s3 = {**s3_env(endpoint), "PYTHONPATH": env["PYTHONPATH"], "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-c", UPLOAD, *map(str, paths)], check=True, env=s3)
        keys = [f"bucket/run/{p.name}" for p in paths]
        pattern = "s3://bucket/run/ckpt_rank*.pt" if len(paths) == args.ranks else None
        urls = [f"s3://{k}" for k in keys] if pattern is None else [pattern]
        served.bytes.clear()
        served.requests.clear()
        compare = _timed("compare s3", bnaudit_argv("compare", *urls, "--fail-on", "never"), s3, args.repeats)
        sent = [served.bytes[k] / args.repeats for k in keys]
        asked = [served.requests[k] / args.repeats for k in keys]
        average = bnaudit_argv("average", *urls, "-o", "s3://bucket/out/fixed.pt", "--force")
        ours = _timed("average s3 -> s3", average, s3, args.repeats)
        roundtrip = [sys.executable, "-c", S3_ROUNDTRIP, str(tmp), str(len(paths))]
        theirs = _timed("roundtrip", roundtrip, s3, args.repeats)
    size = statistics.mean(p.stat().st_size for p in paths)
    print(f"S3 (moto in-process on 127.0.0.1), {len(paths)} ranks: compare {compare:.2f} s, "
          f"{statistics.mean(sent):.0f} bytes/rank ({100 * statistics.mean(sent) / size:.3f}% of the "
          f"file, the server's count), {statistics.mean(asked):.1f} requests/rank")  # fmt: skip
    print(f"average s3 -> s3: {ours:.2f} s; download + average + upload: {theirs:.2f} s; "
          f"ratio {ours / theirs:.3f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=120)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--model", choices=["grid", "resnet18", "resnet50"], default="grid")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--s3-ranks", type=int, default=0, help="the S3 part on the first N ranks only")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="per request, in the latency rows")
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
