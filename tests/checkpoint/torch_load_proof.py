"""Proof that a hostile test file really runs its payload under torch.load, in a child process.

The payload of every hostile file here only touches a marker file in the test's temporary folder; a file
whose payload torch.load would not run is a test that cannot fail, so each malicious case proves it first.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

from tests.conftest import ShellPayload

_LOAD = (
    "import sys, torch\ntry:\n    torch.load(sys.argv[1], weights_only=False)\nexcept Exception:\n    pass\n"
)
# Loads every item of a DCP folder, as dcp.load does for the keys it is given.
_DCP_LOAD = (
    "import sys, tempfile, warnings\nwarnings.simplefilter('ignore')\n"
    "from torch.distributed.checkpoint.format_utils import dcp_to_torch_save\n"
    "try:\n    dcp_to_torch_save(sys.argv[1], tempfile.mktemp())\nexcept Exception:\n    pass\n"
)


def payload(marker: Path) -> bytes:
    """A protocol-2 pickle that runs ``touch marker`` through os.system when unpickled."""
    return pickle.dumps(ShellPayload(marker), protocol=2)


def runs_under_torch_load(path: Path, marker: Path, *, dcp: bool = False) -> bool:
    """Whether torch.load (or dcp.load for a folder) of ``path`` creates ``marker``; it is removed after."""
    assert not marker.exists()
    subprocess.run([sys.executable, "-c", _DCP_LOAD if dcp else _LOAD, str(path)], capture_output=True,
                   timeout=120, check=False)  # fmt: skip
    ran = marker.exists()
    marker.unlink(missing_ok=True)
    return ran
