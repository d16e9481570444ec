"""Property tests for layer discovery and the merge math, and a mutation corpus run through the CLI.

The corpus engine here is shared with ``benchmarks/fuzz_long.py`` (the long run); CI runs a short share.
"""

from __future__ import annotations

import contextlib
import io
import random
import shutil
import signal
import struct
import warnings
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from bnaudit.bn.layers import STAT_SUFFIXES, WRAPPER_PREFIXES, find_bn_layers, normalize_key
from bnaudit.bn.stats import ChannelStats, MergeMethod, RankMerger, kl_normal

# ------------------------------------------------------------------------------------------ layer discovery

_segment = st.text(alphabet="abcdefgxyz0123456789_", min_size=1, max_size=6)
_module_path = st.lists(_segment, min_size=0, max_size=4).map(".".join)
_leaf = st.sampled_from([*STAT_SUFFIXES, "conv_weight", "scale", "running_mean_x"])
_key = st.tuples(_module_path, _leaf).map(lambda t: f"{t[0]}.{t[1]}" if t[0] else t[1])
_prefixes = st.lists(st.sampled_from(WRAPPER_PREFIXES), max_size=4).map("".join)


@given(key=_key, wrappers=_prefixes)
def test_normalize_strips_stacked_wrappers_in_any_order(key: str, wrappers: str) -> None:
    assume(not key.startswith(WRAPPER_PREFIXES))
    assert normalize_key(wrappers + key) == key
    assert normalize_key(normalize_key(wrappers + key)) == normalize_key(wrappers + key)


@given(keys=st.lists(_key, max_size=30, unique=True), wrappers=_prefixes, seed=st.integers(0, 1000))
def test_find_bn_layers_is_exactly_the_prefixes_with_mean_and_var(
    keys: list[str], wrappers: str, seed: int
) -> None:
    wrapped = [wrappers + k for k in keys]
    layers = find_bn_layers(wrapped)
    expected = {
        k.rpartition(".")[0]
        for k in keys
        if k.rpartition(".")[2] == "running_mean" and f"{k[: -len('running_mean')]}running_var" in keys
    }
    names = [layer.name for layer in layers]
    assert sorted(names) == sorted(expected)
    for layer in layers:
        assert set(layer.all_keys()) <= set(wrapped)
        assert layer.running_mean.endswith("running_mean") and layer.running_var.endswith("running_var")
    shuffled = list(wrapped)
    random.Random(seed).shuffle(shuffled)
    assert sorted(x.name for x in find_bn_layers(shuffled)) == sorted(names)
    assert [x.name for x in find_bn_layers(keys)] == names  # wrappers do not change the names


# ---------------------------------------------------------------------------------------------- merge math

_channels = st.integers(1, 4)


@st.composite
def _groups(draw: st.DrawFn) -> list[np.ndarray]:
    """1-6 sample groups of one channel count: (count, channels) float64 arrays with varied scales."""
    channels = draw(_channels)
    seed = draw(st.integers(0, 2**32 - 1))
    sizes = draw(st.lists(st.integers(1, 25), min_size=1, max_size=6))
    rng = np.random.default_rng(seed)
    loc, scale = rng.normal(0, 10, size=channels), rng.uniform(0.01, 5, size=channels)
    return [rng.normal(loc + rng.normal(0, 3, size=channels), scale, size=(n, channels)) for n in sizes]


def _stats(samples: np.ndarray) -> ChannelStats:
    return ChannelStats.from_moments(len(samples), samples.mean(axis=0), samples.var(axis=0))


def _merge_tree(parts: list[ChannelStats], rng: random.Random) -> ChannelStats:
    # Merge random neighbours until one is left: every bracketing and order is reachable.
    parts = list(parts)
    while len(parts) > 1:
        i = rng.randrange(len(parts) - 1)
        parts[i : i + 2] = [
            parts[i].merge(parts[i + 1]) if rng.random() < 0.5 else parts[i + 1].merge(parts[i])
        ]
    return parts[0]


@given(groups=_groups(), seed=st.integers(0, 10_000))
def test_chan_merge_equals_concatenated_samples_in_any_order(groups: list[np.ndarray], seed: int) -> None:
    rng = random.Random(seed)
    stats = [_stats(g) for g in groups]
    rng.shuffle(stats)
    merged = _merge_tree(stats, rng)
    allx = np.concatenate(groups)
    assert merged.count == len(allx)
    np.testing.assert_allclose(merged.mean, allx.mean(axis=0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(merged.var_biased, allx.var(axis=0), rtol=1e-9, atol=1e-12)
    if len(allx) > 1:
        np.testing.assert_allclose(merged.var_unbiased, allx.var(axis=0, ddof=1), rtol=1e-9, atol=1e-12)


@given(groups=_groups(), seed=st.integers(0, 10_000))
def test_pooled_merge_is_the_law_of_total_variance(groups: list[np.ndarray], seed: int) -> None:
    order = list(range(len(groups)))
    random.Random(seed).shuffle(order)
    merger = RankMerger(groups[0].shape[1])
    for i in order:
        merger.add(groups[i].mean(axis=0), groups[i].var(axis=0), weight=len(groups[i]))
    mean, var = merger.result(MergeMethod.POOLED)
    w = np.array([len(g) for g in groups], dtype=np.float64)[:, None]
    m = np.array([g.mean(axis=0) for g in groups])
    v = np.array([g.var(axis=0) for g in groups])
    ref_mean = (w * m).sum(axis=0) / w.sum()
    ref_var = (w * (v + (m - ref_mean) ** 2)).sum(axis=0) / w.sum()
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(var, ref_var, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(var, np.concatenate(groups).var(axis=0), rtol=1e-9, atol=1e-12)
    _, mean_var = merger.result(MergeMethod.MEAN)
    np.testing.assert_allclose(mean_var, (w * v).sum(axis=0) / w.sum(), rtol=1e-10, atol=1e-12)


_finite = st.floats(-1e3, 1e3, allow_nan=False)
_positive = st.floats(1e-4, 1e4, allow_nan=False)


@given(mp=_finite, vp=_positive, mq=_finite, vq=_positive)
def test_kl_is_non_negative_and_zero_only_for_equal_normals(
    mp: float, vp: float, mq: float, vq: float
) -> None:
    kl = float(kl_normal(np.array([mp]), np.array([vp]), np.array([mq]), np.array([vq]))[0])
    assert kl >= -1e-12
    assert float(kl_normal(np.array([mp]), np.array([vp]), np.array([mp]), np.array([vp]))[0]) == 0.0
    if abs(mp - mq) / np.sqrt(vq) > 1e-3 or abs(np.log(vp / vq)) > 1e-3:
        assert kl > 0


# ------------------------------------------------------------------------------------- mutation corpus


class RunTimeout(BaseException):
    """Raised by SIGALRM inside a run; a BaseException so the CLI's own handlers cannot swallow it."""


@dataclass(frozen=True)
class Failure:
    """A run that ended with exit 3 (or a hang): everything needed to reproduce it."""

    seed: int
    base: str
    mutation: str
    args: tuple[str, ...]
    code: int | str
    stderr: str

    def __str__(self) -> str:
        return f"seed={self.seed} base={self.base} mutation={self.mutation} args={self.args} -> {self.code}: {self.stderr.strip()}"


def make_corpus(folder: Path) -> dict[str, Path]:
    """Valid checkpoints of each container, each a reference rank 0 (``*_rank0``)."""
    from tests.checkpoint.test_dcp import save_dcp  # torch.distributed import only when the corpus is built

    rng = np.random.default_rng(0)
    sd: dict[str, torch.Tensor] = {}
    for name, c in (("layer1.bn", 4), ("layer2.0.bn", 3)):
        sd[f"{name}.weight"] = torch.linspace(0.5, 1.5, c)
        sd[f"{name}.bias"] = torch.zeros(c)
        sd[f"{name}.running_mean"] = torch.tensor(rng.normal(size=c), dtype=torch.float32)
        sd[f"{name}.running_var"] = torch.tensor(rng.uniform(0.5, 2, size=c), dtype=torch.float32)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(10)
    folder.mkdir(parents=True, exist_ok=True)
    corpus = {
        "zip": folder / "zip_rank0.pt",
        "legacy": folder / "legacy_rank0.pt",
        "safetensors": folder / "st_rank0.safetensors",
    }
    torch.save({"model": sd, "epoch": 3, "args": {"lr": 0.1}}, corpus["zip"])
    torch.save({"state_dict": sd}, corpus["legacy"], _use_new_zipfile_serialization=False)
    save_file(sd, corpus["safetensors"])
    corpus["dcp"] = save_dcp(folder / "dcp_rank0", {"model": sd, "epoch": 3})
    return corpus


def _pickle_span(data: bytes) -> tuple[int, int]:
    """Byte range of the main pickle: data.pkl of a zip, else the whole file."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            info = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
        name_len, extra_len = struct.unpack_from("<HH", data, info.header_offset + 26)
        start = info.header_offset + 30 + name_len + extra_len
        return start, start + info.compress_size
    except (zipfile.BadZipFile, StopIteration, struct.error):
        return 0, len(data)


def _cd_records(data: bytes) -> list[int]:
    records, pos = [], data.find(b"PK\x01\x02")
    while pos != -1:
        records.append(pos)
        pos = data.find(b"PK\x01\x02", pos + 46)
    return records


def _bitflip(data: bytearray, rng: random.Random) -> str:
    flips = [rng.randrange(len(data) * 8) for _ in range(rng.randint(1, 8))]
    for bit in flips:
        data[bit // 8] ^= 1 << (bit % 8)
    return f"bitflip{flips}"


def _truncate(data: bytearray, rng: random.Random) -> str:
    cut = rng.randrange(len(data))
    del data[cut:]
    return f"truncate@{cut}"


def _pickle_run(data: bytearray, rng: random.Random) -> str:
    start, end = _pickle_span(bytes(data))
    at = rng.randrange(start, max(start + 1, end))
    run = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    data[at : at + len(run)] = run
    return f"pickle-run@{at}:{run.hex()}"


def _swap_offsets(data: bytearray, rng: random.Random) -> str:
    records = _cd_records(bytes(data))
    if len(records) < 2:
        return _bitflip(data, rng)
    a, b = rng.sample(records, 2)
    oa, ob = data[a + 42 : a + 46], data[b + 42 : b + 46]
    data[a + 42 : a + 46], data[b + 42 : b + 46] = ob, oa
    return f"swap-cd-offsets@{a},{b}"


def _rezip(data: bytearray, rng: random.Random) -> str:
    # Swap two entries' contents, or write one entry twice (zip readers take the last duplicate).
    try:
        with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
            items = [(i.filename, zf.read(i.filename)) for i in zf.infolist()]
    except (zipfile.BadZipFile, OSError, EOFError):
        return _bitflip(data, rng)
    i, j = rng.sample(range(len(items)), 2)
    duplicate = rng.random() < 0.5
    if duplicate:
        items.insert(j, (items[i][0], items[j][1]))
    else:
        items[i], items[j] = (items[i][0], items[j][1]), (items[j][0], items[i][1])
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zw, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name"
        for name, payload in items:
            zw.writestr(name, payload)
    data[:] = out.getvalue()
    return f"{'duplicate' if duplicate else 'swap'}-entries:{items[i][0]},{items[j][0]}"


MUTATIONS: dict[str, Callable[[bytearray, random.Random], str]] = {
    "bitflip": _bitflip,
    "truncate": _truncate,
    "pickle-run": _pickle_run,
    "swap-cd-offsets": _swap_offsets,
    "rezip": _rezip,
}


def mutate_copy(base: Path, dst: Path, rng: random.Random) -> str:
    """Write a mutated copy of ``base`` (a file, or a DCP folder with one file mutated) at ``dst``."""
    if base.is_dir():
        shutil.copytree(base, dst)
        target = rng.choice(sorted(p for p in dst.iterdir() if p.is_file()))
    else:
        shutil.copyfile(base, dst)
        target = dst
    data = bytearray(target.read_bytes())
    names = list(MUTATIONS)
    if data[:2] != b"PK":
        names = ["bitflip", "truncate", "pickle-run"]
    name = rng.choice(names)
    what = MUTATIONS[name](data, rng) if data else "empty"
    target.write_bytes(bytes(data))
    return f"{target.name}:{what}"


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise RunTimeout()


def run_cli(args: list[str], limit_s: float) -> tuple[int | str, str]:
    """Run ``bnaudit`` in-process with a wall-clock limit; (exit code or 'timeout', stderr)."""
    from bnaudit.cli import main

    out, err = io.StringIO(), io.StringIO()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    code: int | str = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    except RunTimeout:
        code = "timeout"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    return code, err.getvalue()


def fuzz(
    corpus: dict[str, Path], work: Path, iterations: int, seed: int = 0, limit_s: float = 10.0
) -> Iterator[Failure]:
    """Mutate each corpus entry ``iterations`` times (seeds ``seed``...); yield every run that ends with exit 3
    or exceeds ``limit_s``. Each mutant is inspected and compared with its valid rank 0."""
    for i in range(iterations):
        for base_name, base in corpus.items():
            run_seed = seed + i
            rng = random.Random(f"{base_name}:{run_seed}")
            dst = work / f"mut{run_seed}_{base_name}_rank1{base.suffix}"
            mutation = mutate_copy(base, dst, rng)
            for args in (["inspect", "--security", str(dst)], ["compare", str(base), str(dst)]):
                code, err = run_cli(args, limit_s)
                if code not in (0, 1, 2):
                    yield Failure(run_seed, base_name, mutation, tuple(args), code, err)
            if dst.is_dir():
                shutil.rmtree(dst)
            else:
                dst.unlink()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def test_corpus_is_valid(corpus: dict[str, Path]) -> None:
    for path in corpus.values():
        assert run_cli(["inspect", str(path)], 30)[0] == 0, path


def test_mutated_checkpoints_never_crash_or_hang(corpus: dict[str, Path], tmp_path: Path) -> None:
    failures = list(fuzz(corpus, tmp_path, iterations=250, seed=0, limit_s=10.0))
    assert not failures, "\n".join(map(str, failures[:10]))


settings.register_profile("bnaudit", suppress_health_check=[HealthCheck.too_slow], deadline=None)
settings.load_profile("bnaudit")
