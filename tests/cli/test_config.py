"""[tool.bnaudit] configuration: discovery, precedence, per-command tables, errors, and `bnaudit config`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bnaudit.config import find_config_file, load_config
from bnaudit.defaults import DEFAULT_WARN_KL
from bnaudit.errors import ConfigError
from tests.conftest import bn_state, call_main, save_ranks

CHANNELS = {"stem": 4, "layer1": 8}


@pytest.fixture
def repo(tmp_path, rng, monkeypatch):
    """A repository with 3 ranks whose divergence is a warning at the default thresholds but not an error."""
    (tmp_path / ".git").mkdir()
    states = [bn_state(CHANNELS, rng, shift=0.0) for _ in range(3)]
    paths = save_ranks(tmp_path, states)
    monkeypatch.chdir(tmp_path)
    return tmp_path, [p.name for p in paths]


def _pyproject(folder: Path, text: str) -> Path:
    path = folder / "pyproject.toml"
    path.write_text('[project]\nname = "x"\n\n' + text)
    return path


def _settings(capsys, *args: str) -> dict:
    """The settings a compare run used, from its JSON report (the command line adds --format json)."""
    code, out, err = call_main(capsys, *args[:-1], args[-1], "--format", "json")
    assert code in (0, 1), err
    doc = json.loads(out)
    return {**doc["settings"], "fail_on": doc["fail_on"]}


def test_missing_table_means_defaults(capsys, repo):
    folder, paths = repo
    _pyproject(folder, "[tool.ruff]\nline-length = 100\n")
    code, out, _ = call_main(capsys, "config", "compare")
    fail_on = next(line for line in out.splitlines() if line.startswith("fail-on"))
    assert code == 0 and "none found" in out
    assert fail_on.startswith('fail-on = "error"') and fail_on.endswith("# default")
    assert _settings(capsys, "compare", *paths)["fail_on"] == "error"


def test_precedence_default_global_command_cli(capsys, repo):
    folder, paths = repo
    _pyproject(
        folder,
        '[tool.bnaudit]\nfail-on = "warn"\nerror-kl = 0.5\nignore = ["head.*"]\n\n'
        "[tool.bnaudit.compare]\nerror-kl = 0.3\n",
    )
    run = _settings(capsys, "compare", *paths)
    assert run["fail_on"] == "warn"  # global table
    assert run["error_kl"] == 0.3  # the command table beats the global one
    assert run["ignore"] == ["head.*"]
    assert run["warn_kl"] == DEFAULT_WARN_KL  # default
    run = _settings(capsys, "compare", *paths, "--error-kl", "0.7", "--fail-on", "never")
    assert run["error_kl"] == 0.7 and run["fail_on"] == "never"  # the command line beats both


def test_global_key_for_some_commands_only(capsys, repo):
    folder, paths = repo
    _pyproject(folder, "[tool.bnaudit]\nwarn-kl = 0.001\nsecurity = true\n")
    # warn-kl is compare's, security is inspect's: each command takes its own and ignores the other.
    assert _settings(capsys, "compare", *paths)["warn_kl"] == 0.001
    code, out, _ = call_main(capsys, "inspect", paths[0], "--format", "json")
    assert code == 0 and "globals" in json.loads(out)


def test_discovered_from_a_subfolder(capsys, repo, monkeypatch):
    folder, paths = repo
    _pyproject(folder, '[tool.bnaudit.compare]\nfail-on = "never"\n')
    sub = folder / "a" / "b"
    sub.mkdir(parents=True)
    assert find_config_file(sub) == folder / "pyproject.toml"
    monkeypatch.chdir(sub)
    assert _settings(capsys, "compare", *(str(folder / p) for p in paths))["fail_on"] == "never"


def test_search_stops_at_the_repository_root(tmp_path):
    _pyproject(tmp_path, '[tool.bnaudit]\nfail-on = "warn"\n')
    inner = tmp_path / "checkout"
    (inner / ".git").mkdir(parents=True)
    assert find_config_file(inner) is None
    assert load_config(start=inner).path is None


def test_pyproject_without_table_is_passed_over(tmp_path):
    (tmp_path / ".git").mkdir()
    _pyproject(tmp_path, '[tool.bnaudit]\nfail-on = "warn"\n')
    (tmp_path / "pkg").mkdir()
    _pyproject(tmp_path / "pkg", "[tool.ruff]\nline-length = 100\n")
    assert find_config_file(tmp_path / "pkg") == tmp_path / "pyproject.toml"


def test_config_file_option_reads_a_bnaudit_toml(capsys, repo):
    folder, paths = repo
    _pyproject(folder, '[tool.bnaudit]\nfail-on = "warn"\n')
    custom = folder / "gate.toml"
    custom.write_text('fail-on = "never"\n[compare]\nerror-kl = 0.4\n')
    run = _settings(capsys, "--config", str(custom), "compare", *paths)
    assert run["fail_on"] == "never" and run["error_kl"] == 0.4
    assert _settings(capsys, "--no-config", "compare", *paths)["fail_on"] == "error"


def test_bnaudit_toml_is_discovered(capsys, repo):
    folder, paths = repo
    (folder / "bnaudit.toml").write_text("[compare]\nwarn-kl = 0.002\n")
    assert _settings(capsys, "compare", *paths)["warn_kl"] == 0.002


def test_paths_are_relative_to_the_config_file(capsys, repo):
    folder, _ = repo
    _pyproject(folder, '[tool.bnaudit]\nbaseline = "gate/baseline.json"\n')
    code, out, _ = call_main(capsys, "config", "compare")
    assert code == 0 and f'baseline = "{folder / "gate" / "baseline.json"}"' in out


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (
            '[tool.bnaudit]\nfail_on = "warn"\n',
            "[tool.bnaudit]: unknown key 'fail_on'; write long option names with dashes: 'fail-on'",
        ),
        (
            "[tool.bnaudit]\nerror-klx = 0.2\n",
            "[tool.bnaudit]: unknown key 'error-klx': not an option of any command; did you mean 'error-kl'?",
        ),
        (
            "[tool.bnaudit.compare]\nsecurity = true\n",
            "[tool.bnaudit.compare]: unknown key 'security': not an option of 'compare'",
        ),
        (
            '[tool.bnaudit.comapre]\nfail-on = "warn"\n',
            "[tool.bnaudit.comapre]: unknown command table 'comapre'",
        ),
        (
            '[tool.bnaudit]\nfail-on = "sometimes"\n',
            "[tool.bnaudit] fail-on: 'sometimes' is not one of 'warn', 'error', 'never'.",
        ),
        (
            '[tool.bnaudit]\nerror-kl = "0.2"\n',
            "[tool.bnaudit] error-kl: has the wrong type: expected an integer or a number, found a string '0.2'",
        ),
        ("[tool.bnaudit]\nerror-kl = -1\n", "[tool.bnaudit] error-kl: -1.0 is not in the range x>0.0."),
        (
            '[tool.bnaudit]\ncheck-weights = "yes"\n',
            "[tool.bnaudit] check-weights: has the wrong type: expected true/false, found a string 'yes'",
        ),
        (
            '[tool.bnaudit]\nkey = ["a", "b"]\n',
            "[tool.bnaudit] key: has the wrong type: expected a single value, found a list",
        ),
        ('[tool.bnaudit]\noutput = "r.json"\n', "[tool.bnaudit]: 'output' cannot be set in a config file"),
        ("[tool.bnaudit]\nforce = true\n", "'force' cannot be set in a config file"),
        ("[tool.bnaudit\n", "not valid TOML"),
    ],
)
def test_bad_configuration_exits_2_naming_key_and_file(capsys, repo, table, message):
    folder, paths = repo
    path = _pyproject(folder, table)
    code, out, err = call_main(capsys, "compare", *paths)
    assert code == 2 and out == ""
    assert err.startswith(f"bnaudit: error: {path}") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_config_file_option(capsys, repo):
    _, paths = repo
    code, _, err = call_main(capsys, "--config", "nope.toml", "compare", *paths)
    assert code == 2 and "nope.toml: no such configuration file" in err


def test_config_command_shows_sources(capsys, repo):
    folder, _ = repo
    path = _pyproject(folder, '[tool.bnaudit]\nfail-on = "warn"\n[tool.bnaudit.compare]\nerror-kl = 0.3\n')
    code, out, _ = call_main(capsys, "config", "compare")
    lines = {line.split("=")[0].strip(): line for line in out.splitlines() if "=" in line}
    assert code == 0 and f"configuration file: {path} [tool.bnaudit]" in out
    assert lines["fail-on"].endswith(f"# {path} [tool.bnaudit]")
    assert lines["error-kl"].startswith("error-kl = 0.3") and lines["error-kl"].endswith(
        "[tool.bnaudit.compare]"
    )
    assert lines["warn-kl"].endswith("# default")
    code, out, _ = call_main(capsys, "config")
    assert code == 0 and "[compare]" in out and "[inspect]" in out
    code, _, err = call_main(capsys, "config", "nosuch")
    assert code == 2 and "has no settings" in err


def test_config_error_is_a_config_error(tmp_path):
    path = tmp_path / "bnaudit.toml"
    path.write_text("[compare]\n[compare.deeper]\nx = 1\n")
    with pytest.raises(ConfigError, match="'deeper' is a table") as exc:
        load_config(path)
    assert exc.value.fields.path == str(path)
    assert exc.value.fields.where == "[compare]"
    assert exc.value.fields.fix == "settings here are single values"


def test_global_value_applies_where_it_fits(capsys, repo):
    folder, paths = repo
    # A list of formats fits compare's repeatable --format, not a command with a single --format.
    _pyproject(folder, '[tool.bnaudit]\nformat = ["json", "markdown"]\n')
    code, out, err = call_main(capsys, "compare", *paths, "-o", "r.json")
    assert code in (0, 1), err
    assert "schema_version" in (folder / "r.json").read_text() and out.startswith("## ")
