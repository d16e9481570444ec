"""Zip structure that torch's reader (miniz) and other readers see differently: name case, duplicate
names, two central directories, members beyond the end record, CRCs and flags torch does not check."""

from __future__ import annotations

from pathlib import Path

from tests.security.corpus.carriers import data_pkl_name, save_torch, splice, zip_members
from tests.security.corpus.ops import system_call
from tests.security.corpus.registry import case
from tests.security.corpus.zipraw import Member, archive, central_record, end_record, local_record

SYSTEM = ("os.system", "posix.system")


def _members(folder: Path, stem: str) -> tuple[list[Member], str]:
    """The members of a real torch.save checkpoint (saved then read back) and its data.pkl's name."""
    path = save_torch(folder / f"{stem}.src")
    pairs = zip_members(path)
    path.unlink()
    return [Member(n, d) for n, d in pairs], data_pkl_name(pairs)


def _evil(members: list[Member], name: str, m: str) -> bytes:
    return splice(next(x.data for x in members if x.name == name), system_call(m))


def _write(folder: Path, stem: str, data: bytes) -> Path:
    path = folder / f"{stem}.pt"
    path.write_bytes(data)
    return path


@case("zip:Data.pkl-case", "zip", SYSTEM, structure=True)
def _case_name(folder: Path, m: str) -> Path:
    members, name = _members(folder, "case")
    evil = Member(name[: -len("data.pkl")] + "Data.pkl", _evil(members, name, m))
    return _write(folder, "zip-case", archive([evil, *members]))


@case("zip:duplicate-data.pkl", "zip", SYSTEM, structure=True)
def _duplicate(folder: Path, m: str) -> Path:
    members, name = _members(folder, "dup")
    return _write(folder, "zip-duplicate", archive([Member(name, _evil(members, name, m)), *members]))


@case("zip:two-central-directories", "zip", SYSTEM, structure=True)
def _two_directories(folder: Path, m: str) -> Path:
    # The end record's offset names the evil directory (torch follows it); the directory right before the
    # end record, of the same size, is the benign one (Python's zipfile follows that, shifting offsets).
    members, name = _members(folder, "two")
    evil_members = [Member(x.name, _evil(members, name, m)) if x.name == name else x for x in members]
    body, evil_offsets = b"", []
    for member in evil_members:
        evil_offsets.append(len(body))
        body += local_record(member)
    evil_directory_at = len(body)
    body += b"".join(central_record(x, o) for x, o in zip(evil_members, evil_offsets, strict=True))
    benign_offsets = []
    for member in members:
        benign_offsets.append(len(body))
        body += local_record(member)
    shift = len(body) - evil_directory_at  # zipfile adds this to every offset it reads
    benign = b"".join(central_record(x, o - shift) for x, o in zip(members, benign_offsets, strict=True))
    return _write(
        folder, "zip-two-dirs", body + benign + end_record(len(members), len(benign), evil_directory_at)
    )


@case("zip:member-after-end-record", "zip", SYSTEM, structure=True)
def _after_end(folder: Path, m: str) -> Path:
    members, name = _members(folder, "after")
    others = [x for x in members if x.name != name]
    body, offsets = b"", []
    for member in others:
        offsets.append(len(body))
        body += local_record(member)
    evil = Member(name, _evil(members, name, m))
    # data.pkl's local record sits past the end record; its directory entry points there.
    directory = b"".join(central_record(x, o) for x, o in zip(others, offsets, strict=True))
    tail_at = len(body) + len(directory) + len(central_record(evil, 0)) + len(end_record(0, 0, 0))
    directory += central_record(evil, tail_at)
    end = end_record(len(members), len(directory), len(body))
    return _write(folder, "zip-after-end", body + directory + end + local_record(evil))


@case("zip:data.pkl-bad-crc", "zip", SYSTEM, structure=True)
def _bad_crc(folder: Path, m: str) -> Path:
    members, name = _members(folder, "crc")
    evil = [Member(x.name, _evil(members, name, m), crc=0x12345678) if x.name == name else x for x in members]
    return _write(folder, "zip-bad-crc", archive(evil))


@case("zip:encrypted-flag-local-header", "zip", SYSTEM, structure=True)
def _flag_local(folder: Path, m: str) -> Path:
    # Bit 0 (encrypted) set in data.pkl's local header only; the central directory says plain.
    members, name = _members(folder, "flag")
    body, offsets = b"", []
    for member in members:
        offsets.append(len(body))
        data = _evil(members, name, m) if member.name == name else member.data
        body += local_record(Member(member.name, data), flags=1 if member.name == name else 0)
    final = [Member(x.name, _evil(members, name, m)) if x.name == name else x for x in members]
    directory = b"".join(central_record(x, o) for x, o in zip(final, offsets, strict=True))
    return _write(
        folder, "zip-flag-local", body + directory + end_record(len(final), len(directory), len(body))
    )
