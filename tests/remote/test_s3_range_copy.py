"""average S3 -> S3 by server-side copy on moto: the part planner against a brute force, the object equal to a
local average byte for byte, failures that leave nothing behind, --force."""

from __future__ import annotations

import functools
import itertools
import json
import random
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from bnaudit.checkpoint.s3_part_plan import MIN_PART, PartLimits, plan_parts
from tests.remote.servers import s3_run_bucket
from tests.remote.test_remote_inputs import bnaudit

RANKS = ["big_rank0.pt", "big_rank1.pt"]


def _cheapest_upload(size: int, dirty: list[tuple[int, int]], min_part: int) -> int:
    """The fewest bytes any legal cut uploads, by trying every cut (a part holding a dirty byte is uploaded)."""
    bad = [any(a <= i < b for a, b in dirty) for i in range(size)]

    @functools.cache
    def rest(start: int) -> int:
        best = size + 1
        for end in range(start + 1, size + 1):
            if end < size and end - start < min_part:
                continue
            cost = (end - start) * any(bad[start:end])
            best = min(best, cost + (rest(end) if end < size else 0))
        return best

    return rest(0)


def _check_rules(size: int, dirty: list[tuple[int, int]], parts: list[Any], lim: PartLimits) -> None:
    assert parts[0].start == 0 and parts[-1].end == size
    covered = bytearray(size)
    for part in parts:
        covered[part.start : part.end] = bytes(c + 1 for c in covered[part.start : part.end])
    assert set(covered) == {1}  # every byte of the output in exactly one part
    assert all(lim.min_part <= p.size for p in parts[:-1]) and all(p.size <= lim.max_part for p in parts)
    for a, b in dirty:  # every patched byte in an uploaded part
        assert all(any(p.start <= i < p.end and not p.copy for p in parts) for i in range(a, b))


def test_the_planner_uploads_the_fewest_bytes_a_brute_force_finds() -> None:
    rng = random.Random(17)
    for _ in range(1500):
        size, min_part = rng.randint(1, 48), rng.randint(1, 9)
        lim = PartLimits(min_part, max_part=4 * min_part, max_upload_part=2 * min_part)
        dirty = []
        for _ in range(rng.randint(0, 6)):
            start = rng.randrange(size)
            dirty.append((start, min(size, start + rng.randint(1, 4))))
        parts = plan_parts(size, dirty, lim)
        _check_rules(size, dirty, parts, lim)
        uploaded = sum(p.size for p in parts if not p.copy)
        assert uploaded == _cheapest_upload(size, dirty, min_part), (size, min_part, dirty, parts)


def test_the_planner_on_checkpoint_sized_layouts() -> None:
    rng = random.Random(5)
    for _ in range(200):
        size = rng.randint(1, 4000) * MIN_PART // rng.randint(1, 40)
        dirty = sorted((o, o + rng.randint(4, 70_000)) for o in rng.sample(range(size), min(size, 30)))
        dirty = [(a, min(b, size)) for a, b in dirty]
        parts = plan_parts(size, dirty)
        assert parts[0].start == 0 and parts[-1].end == size
        assert all(a.end == b.start for a, b in itertools.pairwise(parts))
        assert all(p.size >= MIN_PART for p in parts[:-1]) and all(p.size <= 5 << 30 for p in parts)
        for a, b in dirty:  # the first and last byte of each patch lie in uploaded parts
            for i in (a, b - 1):
                assert any(p.start <= i < p.end and not p.copy for p in parts)
        # a float bound: an uploaded run holds patched bytes, or is one forced minimum part around them
        uploaded = [p for p in parts if not p.copy]
        assert (
            sum(p.size for p in uploaded) <= sum(b - a for a, b in dirty) + (len(dirty) + 1) * 2.0 * MIN_PART
        )


def _big_rank(path: Path, rank: int) -> None:
    """BatchNorm layers between 12 MB convolutions, and 8 MB of optimizer-like state after the model."""
    rng = np.random.default_rng(rank)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for i in range(3):
        sd[f"b{i}.conv.weight"] = torch.full((3_000_000,), float(i))
        sd[f"b{i}.bn.weight"] = torch.ones(16)
        sd[f"b{i}.bn.bias"] = torch.zeros(16)
        sd[f"b{i}.bn.running_mean"] = torch.tensor(rng.normal(size=16) + rank, dtype=torch.float32)
        sd[f"b{i}.bn.running_var"] = torch.tensor(rng.uniform(0.5, 2, size=16), dtype=torch.float32)
        sd[f"b{i}.bn.num_batches_tracked"] = torch.tensor(100)
    torch.save({"model": sd, "optimizer": {"exp_avg": torch.arange(2_000_000, dtype=torch.float32)}}, path)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("big")
    for r, name in enumerate(RANKS):
        _big_rank(folder / name, r)
    return folder


@pytest.fixture(scope="module")
def s3(ranks: Path) -> Iterator[dict[str, str]]:
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    with s3_run_bucket(str(ranks / n) for n in RANKS) as env:
        yield env


def _left_behind(fs: Any, folder: str) -> tuple[list[str], list[Any]]:
    """The objects under ``folder`` (temporary ones included) and the unfinished multipart uploads."""
    fs.invalidate_cache()
    names = [p.rsplit("/", 1)[1] for p in fs.find(f"bucket/{folder}")]
    return names, fs.call_s3("list_multipart_uploads", Bucket="bucket").get("Uploads", [])


def test_average_s3_to_s3_by_server_side_copy(
    ranks: Path, s3: dict[str, str], fs: Any, tmp_path: Path
) -> None:
    local = tmp_path / "local.pt"
    assert bnaudit("average", *(str(ranks / n) for n in RANKS), "-o", str(local)).returncode == 0
    args = ["average", "s3://bucket/run/big_rank*.pt", "-o", "s3://bucket/out/fixed.pt", "--format", "json"]
    result = bnaudit(*args, env=s3)
    assert result.returncode == 0, result.stderr
    upload = json.loads(result.stdout)["average"]["upload"]
    assert upload.startswith("server-side copy: ") and "bytes copied in" in upload, upload
    copied, uploaded = (int(upload.split(" bytes ")[i].rsplit(" ", 1)[-1]) for i in (0, 1))
    size = local.stat().st_size
    assert copied + uploaded == size and uploaded < size / 2  # the convolutions and optimizer state copied
    assert fs.cat_file("bucket/out/fixed.pt") == local.read_bytes()
    side = json.loads(fs.cat_file("bucket/out/fixed.pt.bnaudit.json"))
    assert side["output"]["path"] == "s3://bucket/out/fixed.pt" and side["output"]["upload"] == upload
    assert _left_behind(fs, "out") == (["fixed.pt", "fixed.pt.bnaudit.json"], [])
    again = bnaudit(*args, env=s3)
    assert (
        again.returncode == 2
        and "already exists" in again.stderr
        and "s3://bucket/out/fixed.pt" in again.stderr
    )
    fs.pipe_file("bucket/out/fixed.pt", b"something else")
    forced = bnaudit(*args, "--force", env=s3)
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["average"]["upload"].startswith("server-side copy")
    assert fs.cat_file("bucket/out/fixed.pt") == local.read_bytes()


def _patched(url: str) -> tuple[Any, list[Any]]:
    from bnaudit.checkpoint.load import load_checkpoint
    from bnaudit.checkpoint.patch_plan import TensorPatch

    ckpt = load_checkpoint(url)
    ref = ckpt.state_dict("model").tensors["b1.bn.running_mean"]
    return ckpt, [TensorPatch("model", "b1.bn.running_mean", ref, np.full(ref.shape, 0.25))]


def test_a_denied_part_leaves_nothing(fs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import s3fs

    from bnaudit.checkpoint.remote_write import write_repaired
    from bnaudit.errors import InputError

    real = s3fs.S3FileSystem.call_s3

    def deny_uploads(self: Any, method: str, *args: Any, **kwargs: Any) -> Any:
        if method == "upload_part":  # s3fs's translation of an AccessDenied answer
            raise PermissionError("AccessDenied")
        return real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "call_s3", deny_uploads)
    ckpt, patches = _patched("s3://bucket/run/big_rank0.pt")
    with pytest.raises(InputError, match="access denied"):
        write_repaired(ckpt, patches, "s3://bucket/denied/fixed.pt")
    assert _left_behind(fs, "denied") == ([], [])


def test_a_failed_verification_leaves_nothing(fs: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from bnaudit.checkpoint import s3_range_copy
    from bnaudit.checkpoint.patch_verify import verification_failed
    from bnaudit.checkpoint.remote_write import write_repaired
    from bnaudit.errors import InternalError

    def fail(tmp: Any, *args: Any) -> None:
        assert fs.exists(f"{tmp.bucket}/{tmp.key}")  # the upload was completed to the temporary key
        raise verification_failed(Path(tmp.url), "injected")

    monkeypatch.setattr(s3_range_copy, "verify_object", fail)
    ckpt, patches = _patched("s3://bucket/run/big_rank1.pt")
    with pytest.raises(InternalError, match="injected"):
        write_repaired(ckpt, patches, "s3://bucket/unverified/fixed.pt")
    assert _left_behind(fs, "unverified") == ([], [])


def test_the_written_tensor_reads_back(fs: Any) -> None:
    from bnaudit.checkpoint.load import load_checkpoint
    from bnaudit.checkpoint.remote_write import write_repaired
    from bnaudit.checkpoint.tensors import read_tensor

    ckpt, patches = _patched("s3://bucket/run/big_rank1.pt")
    result = write_repaired(ckpt, patches, "s3://bucket/lib/fixed.pt")
    assert result.upload is not None and result.upload.startswith("server-side copy")
    out = load_checkpoint("s3://bucket/lib/fixed.pt")
    assert np.array_equal(
        read_tensor(out.state_dict("model").tensors["b1.bn.running_mean"]), np.full(16, 0.25)
    )
    fetched = fs.cat_file("bucket/lib/fixed.pt")
    with torch.serialization.safe_globals([]):
        import io

        loaded = torch.load(io.BytesIO(fetched), weights_only=True)  # zip CRCs checked by torch's reader
    assert torch.equal(loaded["model"]["b1.bn.running_mean"], torch.full((16,), 0.25))
    assert torch.equal(loaded["optimizer"]["exp_avg"], torch.arange(2_000_000, dtype=torch.float32))


def _safetensors_rank(path: Path, rank: int) -> None:
    """BatchNorm layers between 8 MB tensors in one safetensors file (its header grows with the metadata)."""
    from safetensors.torch import save_file

    rng = np.random.default_rng(10 + rank)
    tensors = {}
    for i in range(3):
        tensors[f"l{i}.conv.weight"] = torch.full((2_000_000,), float(i))
        tensors[f"l{i}.bn.weight"] = torch.ones(8)
        tensors[f"l{i}.bn.bias"] = torch.zeros(8)
        tensors[f"l{i}.bn.running_mean"] = torch.tensor(rng.normal(size=8) - rank, dtype=torch.float32)
        tensors[f"l{i}.bn.running_var"] = torch.tensor(rng.uniform(0.5, 2, size=8), dtype=torch.float32)
        tensors[f"l{i}.bn.num_batches_tracked"] = torch.tensor(100)
    save_file(tensors, str(path))


def test_safetensors_and_small_files(s3: dict[str, str], fs: Any, tmp_path: Path) -> None:
    from tests.conftest import bn_state

    for r in range(2):
        _safetensors_rank(tmp_path / f"st_rank{r}.safetensors", r)
        torch.save(
            {"model": bn_state({"a": 8, "b": 4}, np.random.default_rng(r), r)}, tmp_path / f"s_rank{r}.pt"
        )
        for name in (f"st_rank{r}.safetensors", f"s_rank{r}.pt"):
            fs.put_file(str(tmp_path / name), f"bucket/mixed/{name}")
    for pattern, out, path in [
        ("st_rank*.safetensors", "st_fixed.safetensors", "server-side copy: "),
        ("s_rank*.pt", "s_fixed.pt", "single-part upload"),  # 4 KB: nothing to copy, one PUT
    ]:
        local = tmp_path / out
        assert bnaudit("average", str(tmp_path / pattern), "-o", str(local)).returncode == 0
        url = f"s3://bucket/mixed/{out}"
        result = bnaudit("average", f"s3://bucket/mixed/{pattern}", "-o", url, "--format", "json", env=s3)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["average"]["upload"].startswith(path)
        assert fs.cat_file(url) == local.read_bytes()


def test_the_reference_is_never_the_output(fs: Any) -> None:
    from bnaudit.checkpoint.remote_write import write_repaired
    from bnaudit.errors import OutputError

    ckpt, patches = _patched("s3://bucket/run/big_rank0.pt")
    before = fs.info("bucket/run/big_rank0.pt")["ETag"]
    with pytest.raises(OutputError, match="is the reference"):
        write_repaired(ckpt, patches, "s3://bucket/run/big_rank0.pt", replace_existing=True)
    fs.invalidate_cache()
    assert fs.info("bucket/run/big_rank0.pt")["ETag"] == before


def test_an_object_that_appears_meanwhile_is_kept_without_force(
    fs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bnaudit.checkpoint import s3_range_copy
    from bnaudit.checkpoint.remote_write import write_repaired
    from bnaudit.errors import OutputError

    real = s3_range_copy.verify_object

    def verify_then_race(*args: Any) -> None:
        real(*args)
        fs.pipe_file("bucket/race/fixed.pt", b"another writer's object")  # after the policy's first check

    monkeypatch.setattr(s3_range_copy, "verify_object", verify_then_race)
    ckpt, patches = _patched("s3://bucket/run/big_rank0.pt")
    with pytest.raises(OutputError, match="already exists"):
        write_repaired(ckpt, patches, "s3://bucket/race/fixed.pt")
    assert fs.cat_file("bucket/race/fixed.pt") == b"another writer's object"
    assert _left_behind(fs, "race") == (["fixed.pt"], [])
    result = write_repaired(ckpt, patches, "s3://bucket/race/fixed.pt", replace_existing=True)
    assert result.upload is not None and result.upload.startswith("server-side copy")
    assert fs.cat_file("bucket/race/fixed.pt", start=0, end=2) == b"PK"
