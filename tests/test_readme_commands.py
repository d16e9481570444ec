"""Every shell command in the README runs as written, on the committed fixtures, and prints what it shows.

The commands are taken from the README's code blocks (lines starting ``bnaudit``, ``$ bnaudit``,
``.venv/bin/``, ``python``), backslash continuations joined, comments dropped. They run in a scratch folder
that holds what the README's illustrative paths name: ``fixtures/`` (the committed fixtures), the label-sorted
run's ranks as ``ckpt_rank*.pt``, and ``ckpts/`` with per-rank ``save_rank_stats`` files and ``last.pt``.
Where a block of output follows a command, every line it shows (``...`` ends an abbreviated line) must be
printed. Left out, each for the reason given in ``NOT_RUN_HERE``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, REPO

README = (REPO / "README.md").read_text()
PREFIXES = ("bnaudit ", "$ bnaudit ", ".venv/bin/", "python", "torchrun ")
NOT_RUN_HERE = {
    "python3 -m venv": "the install: .ci/run runs it on a fresh clone before the tests",
    ".venv/bin/pytest": "the test command itself: .ci/run runs it",
    "benchmarks/gate_calibration.py": "the 15-minute study: its --smoke and --analyse runs are tests/test_gate_calibration.py",
    "fixtures/make_fixtures.py": "regenerates the fixtures: tests/test_fixtures.py runs it (slow)",
    "s3://": "needs an S3 server: tests/remote/test_remote_inputs.py runs compare and average against moto on 127.0.0.1",
    "https://example.com": "an illustrative URL: tests/remote/test_remote_inputs.py serves real ranks over HTTP",
}


def _is_command(line: str) -> bool:
    # "bnaudit compare: 4 ranks, ..." is the title of a report, not a command.
    return line.startswith(PREFIXES) and not re.match(r"(\$ )?bnaudit [a-z]+:", line)


def _blocks() -> list[tuple[str, str]]:
    """(command block, the output block that follows it or "") for every fenced block with commands."""
    fences = list(re.finditer(r"```[a-z]*\n(.*?)```", README, re.S))
    out = []
    for i, fence in enumerate(fences):
        body = fence.group(1)
        if not any(_is_command(line) for line in body.splitlines()):
            continue
        following = fences[i + 1].group(1) if i + 1 < len(fences) else ""
        gap = README[fence.end() : fences[i + 1].start()] if i + 1 < len(fences) else "x"
        shown = following if not gap.strip() and not _is_command(following.split("\n", 1)[0]) else ""
        out.append((body, shown))
    return out


def _commands(body: str) -> list[tuple[str, list[str]]]:
    """(the command as written, the console lines shown in the same block after a ``$`` command)."""
    joined = body.replace("\\\n", " ")
    commands: list[tuple[str, list[str]]] = []
    for line in joined.splitlines():
        if _is_command(line):
            commands.append((line.removeprefix("$ "), []))
        elif commands and body.lstrip().startswith("$ "):
            commands[-1][1].append(line)
    return commands


# One case per block: its commands run in order in one fresh folder (a baseline written by the first is read
# by the second); each block gets its own copy, so no block sees another's outputs.
CASES = [
    pytest.param(
        [(c, shown or block_out.splitlines()) for c, shown in _commands(body)], id=_commands(body)[0][0][:60]
    )
    for body, block_out in _blocks()
]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    (folder / "fixtures").symlink_to(FIXTURES)
    for r in range(4):
        shutil.copy(FIXTURES / "ddp_nosync_sorted" / f"ckpt_rank{r}.pt", folder / f"ckpt_rank{r}.pt")
    _rank_stats(folder / "ckpts")
    _folder_checkpoints(folder)
    return folder


def _folder_checkpoints(folder: Path) -> None:
    """The folders the README's folder repairs name: two ranks as sharded Hugging Face folders (``run/``),
    and a DCP checkpoint with save_rank_stats files beside it (``ckpt/step_1000``)."""
    code = (
        "import json, sys, warnings, torch, torch.distributed.checkpoint as dcp, bnaudit\n"
        "from safetensors.torch import save_file\n"
        "src, here = sys.argv[1], sys.argv[2]\n"
        "for r in range(4):\n"
        "    sd = torch.load(f'{src}/ddp_nosync_sorted/ckpt_rank{r}.pt', weights_only=True)['model']\n"
        "    keys = list(sd); half = {k: ('model-00001-of-00002.safetensors' if i < len(keys) // 2\n"
        "                         else 'model-00002-of-00002.safetensors') for i, k in enumerate(keys)}\n"
        "    if r < 2:\n"
        "        out = f'{here}/run/rank{r}_hf'; __import__('os').makedirs(out)\n"
        "        for shard in set(half.values()):\n"
        "            save_file({k: sd[k].contiguous() for k in keys if half[k] == shard}, f'{out}/{shard}')\n"
        "        open(f'{out}/model.safetensors.index.json', 'w').write(json.dumps({'weight_map': half}))\n"
        "    if r == 0:\n"
        "        with warnings.catch_warnings():\n"
        "            warnings.simplefilter('ignore')\n"
        "            dcp.save({'model': sd}, checkpoint_id=f'{here}/ckpt/step_1000', no_dist=True)\n"
        "    stats = {k: v for k, v in sd.items() if k.endswith(('running_mean', 'running_var'))}\n"
        "    save_file({k: v.contiguous() for k, v in stats.items()}, f'{here}/ckpt/step_1000/bn_stats_rank{r}.safetensors')\n"
    )
    subprocess.run([sys.executable, "-c", code, str(FIXTURES), str(folder)], check=True, cwd=REPO)


def _rank_stats(ckpts: Path) -> None:
    """What a training job leaves: save_rank_stats per rank, and rank 0's full checkpoint as last.pt."""
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import digits, bnaudit\n"
        "for r in range(4):\n"
        "    ckpt = torch.load(f'{sys.argv[1]}/ddp_nosync_sorted/ckpt_rank{r}.pt', weights_only=True)\n"
        "    m = digits.build_model(); m.load_state_dict(ckpt['model'])\n"
        "    bnaudit.save_rank_stats(m, sys.argv[2], rank=r, samples=350)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(FIXTURES), f"{ckpts}/"], check=True, cwd=REPO)
    shutil.copy(FIXTURES / "ddp_nosync_sorted" / "ckpt_rank0.pt", ckpts / "last.pt")


def _argv(command: str) -> list[str] | None:
    words = shlex.split(command, comments=True)
    if words[0] in ("bnaudit", ".venv/bin/bnaudit"):
        return [sys.executable, "-m", "bnaudit", *words[1:]]
    if words[0] == ".venv/bin/python":
        return [sys.executable, *(str(REPO / w) if w.endswith(".py") else w for w in words[1:])]
    return None


@pytest.mark.parametrize("commands", CASES)
def test_readme_block(commands: list[tuple[str, list[str]]], scratch: Path, tmp_path: Path) -> None:
    folder = tmp_path / "here"
    shutil.copytree(scratch, folder, symlinks=True)
    ran = 0
    for command, shown in commands:
        reason = next((why for key, why in NOT_RUN_HERE.items() if key in command), None)
        if reason is None:
            _run(command, shown, folder)
            ran += 1
    if not ran:
        pytest.skip("; ".join(why for key, why in NOT_RUN_HERE.items() if any(key in c for c, _ in commands)))


def _run(command: str, shown: list[str], folder: Path) -> None:
    argv = _argv(command)
    assert argv is not None, f"the README command {command!r} has no runner here: add one or a reason"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(argv, capture_output=True, text=True, cwd=folder, env=env, timeout=300)
    assert result.returncode in (0, 1), f"{command}\n{result.stderr}"
    printed = result.stdout.splitlines()
    for line in shown:
        if not line.strip():
            continue
        if line.endswith("..."):
            assert any(p.startswith(line[:-3].rstrip()) for p in printed), line
        else:
            assert line in printed, f"{command}: README shows {line!r}"


def test_the_configuration_example_works_as_pasted_and_its_baseline_bootstraps(
    scratch: Path, tmp_path: Path
) -> None:
    section = README[README.index("### Configuration") :]
    toml = section[section.index("```toml\n") + 8 : section.index("```", section.index("```toml\n") + 8)]
    bootstrap = re.search(r"`(bnaudit compare [^`]*--write-baseline [^`]*)`", section)
    assert bootstrap is not None
    folder = tmp_path / "project"
    shutil.copytree(scratch, folder, symlinks=True)
    (folder / ".git").mkdir()  # the configuration search stops at the repository root
    (folder / "pyproject.toml").write_text(toml)
    (folder / "ci").mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    argv = _argv(bootstrap.group(1))
    assert argv is not None

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args], capture_output=True, text=True, cwd=folder, env=env, timeout=300)

    before = run(sys.executable, "-m", "bnaudit", "compare", "ckpt_rank*.pt")
    assert before.returncode == 2 and "bnaudit-baseline.json" in before.stderr  # configured, not written yet
    made = run(*argv)
    assert made.returncode in (0, 1), made.stderr
    assert (folder / "ci" / "bnaudit-baseline.json").is_file()
    after = run(sys.executable, "-m", "bnaudit", "compare", "ckpt_rank*.pt")
    assert after.returncode == 0, after.stdout + after.stderr  # the configured baseline accepts what it saw
    assert after.stdout.startswith("::")  # the configured format: github annotations
