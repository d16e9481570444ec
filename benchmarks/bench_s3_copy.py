"""Benchmark ``bnaudit average`` S3 -> S3 by server-side copy against download + local average + upload.

Two sets of ranks on moto's S3 server (127.0.0.1), built by bench_remote.py's builder (bench_compare.py's
shape: conv+BN layers of 512 channels):

- ``model``: 4 ranks of about 100 MB (26 layers): BatchNorm tensors every 1 to 9 MB, so S3's 5 MiB
  minimum part forces many unchanged bytes into the uploaded parts;
- ``optimizer``: 4 ranks of about 100 MB whose model (9 layers, 34 MB) is followed by an Adam-like
  optimizer state (``exp_avg``, ``exp_avg_sq`` per convolution): the state is one long unchanged run.

For each: bytes copied server-side, uploaded and fetched by range GET (from the report's ``upload``), the
bytes through the client (those and the inputs' reads), wall time of average and of compare (the reading
alone), against the round trip (download every rank, ``bnaudit average`` locally, upload the result);
both outputs are checked identical. Usage:
    python benchmarks/bench_s3_copy.py                # 4 ranks x ~100 MB, both sets (needs ~2 GB of disk)
    python benchmarks/bench_s3_copy.py --smoke        # 2 small ranks, for CI
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _common import bnaudit_argv, python_env
from bench_remote import S3_ROUNDTRIP, _make

from tests.remote.servers import moto_server, s3_env

WITH_OPTIMIZER = """
import sys, torch
for p in sys.argv[1:]:
    ckpt = torch.load(p, weights_only=True)
    convs = [v for k, v in ckpt["model"].items() if k.endswith("conv.weight")]
    state = {i: {"step": torch.tensor(10.0), "exp_avg": w * 0.01, "exp_avg_sq": w * w}
             for i, w in enumerate(convs)}
    ckpt["optimizer"] = {"state": state, "param_groups": [{"lr": 0.1, "params": list(range(len(convs)))}]}
    torch.save(ckpt, p)
"""
UPLOAD = """
import sys, s3fs
fs = s3fs.S3FileSystem()
if not fs.exists("bucket"):
    fs.mkdir("bucket")
for p in sys.argv[1:]:
    fs.put(p, "bucket/run/" + p.rsplit("/", 1)[1])
"""
SAME = """
import sys, s3fs
fs = s3fs.S3FileSystem()
print(fs.cat_file(sys.argv[1]) == fs.cat_file(sys.argv[2]))
"""
_UPLOAD = re.compile(r"(\d+) bytes copied in (\d+) parts, (\d+) bytes uploaded in (\d+) parts \((\d+) of")


def _set(folder: Path, name: str, args: argparse.Namespace, layers: int) -> list[Path]:
    """One set of ranks in ``folder/name`` (bench_remote's builder; the optimizer state added after)."""
    where = folder / name
    where.mkdir()
    # bench_remote's grid of conv + BatchNorm layers (its --model default)
    shape = argparse.Namespace(ranks=args.ranks, layers=layers, channels=args.channels, model="grid")
    paths = _make(where, shape)
    if name == "optimizer":
        subprocess.run([sys.executable, "-c", WITH_OPTIMIZER, *map(str, paths)], check=True)
    return paths


def _run(argv: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        sys.exit(f"{argv[:4]} exited {done.returncode}: {done.stderr}")
    return seconds, done.stdout


def _measure(name: str, paths: list[Path], s3: dict[str, str], scratch: Path) -> dict[str, Any]:
    subprocess.run([sys.executable, "-c", UPLOAD, *map(str, paths)], check=True, env=s3)
    # bench_remote's round trip reads bucket/run/ckpt_rank*.pt: each set is uploaded there in turn.
    pattern, out = "s3://bucket/run/ckpt_rank*.pt", f"s3://bucket/out/{name}.pt"
    reading, _ = _run(bnaudit_argv("compare", pattern, "--fail-on", "never"), s3)
    ours, report = _run(bnaudit_argv("average", pattern, "-o", out, "--force", "--format", "json"), s3)
    upload = json.loads(report)["average"]["upload"]
    read = sum(i["transfer"]["bytes_read"] for i in json.loads(report)["inputs"])
    theirs, _ = _run([sys.executable, "-c", S3_ROUNDTRIP, str(scratch)], s3)
    _, same = _run([sys.executable, "-c", SAME, f"bucket/out/{name}.pt", "bucket/out/roundtrip.pt"], s3)
    size = paths[0].stat().st_size
    return {"set": name, "size": size, "upload": upload, "ours": ours, "theirs": theirs, "same": same.strip(),
            "read": read, "compare": reading}  # fmt: skip


def _print(rows: list[dict[str, Any]], ranks: int) -> None:
    print(f"{'set':10} {'MB/rank':>8} {'copied':>11} {'parts':>5} {'uploaded':>10} {'parts':>5} "
          f"{'fetched':>10} {'client bytes':>12} {'average s':>9} {'compare s':>9} {'round trip s':>12} "
          f"{'round trip bytes':>16} identical")  # fmt: skip
    for row in rows:
        size = int(row["size"])
        found = _UPLOAD.search(str(row["upload"]))
        copied, cparts, uploaded, uparts, fetched = (int(g) for g in found.groups()) if found else (0,) * 5
        client = int(row["read"]) + uploaded + fetched
        print(f"{row['set']:10} {size / 1e6:8.1f} {copied:11d} {cparts:5d} {uploaded:10d} {uparts:5d} "
              f"{fetched:10d} {client:12d} {row['ours']:9.2f} {row['compare']:9.2f} {row['theirs']:12.2f} "
              f"{(ranks + 1) * size:16d} {row['same']}")  # fmt: skip
        print(f"  upload: {row['upload']}")
    print("s3 copy: done")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--layers", type=int, default=26, help="layers of the model-only set")
    parser.add_argument("--optimizer-layers", type=int, default=9, help="layers of the set with optimizer")
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--smoke", action="store_true", help="2 ranks of ~12 MB, one run (for CI)")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    if args.smoke:
        args.ranks, args.layers, args.optimizer_layers = 2, 3, 3
    env = python_env()
    rows = []
    with (
        tempfile.TemporaryDirectory(dir=args.workdir) as made,
        tempfile.TemporaryDirectory(dir=args.workdir) as scratch,
        moto_server() as endpoint,
    ):
        s3 = {**s3_env(endpoint), "PYTHONPATH": env["PYTHONPATH"], "OMP_NUM_THREADS": "1"}
        for name, layers in (("model", args.layers), ("optimizer", args.optimizer_layers)):
            paths = _set(Path(made), name, args, layers)
            rows.append(_measure(name, paths, s3, Path(scratch)))
    _print(rows, args.ranks)


if __name__ == "__main__":
    main()
