"""Every error bnaudit raises says where it happened: each construction names a field besides the problem."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from bnaudit import errors
from bnaudit.errors import ErrorFields, InputError, format_message

PACKAGE = Path(errors.__file__).resolve().parent
ERROR_CLASSES = {
    "BnauditError",
    "InputError",
    "UnsupportedFormatError",
    "ModelMismatchError",
    "NoBatchNormError",
    "UsageError",
    "ConfigError",
    "OutputError",
    "InternalError",
    "DtypeOverflowError",
}
# Errors that carry a message another process already formatted from its own fields.
RELAYS = {("live/launch.py", "BnauditError")}


def _bare_constructions() -> list[str]:
    bare = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
                continue
            if node.func.id in ERROR_CLASSES and not node.keywords and (rel, node.func.id) not in RELAYS:
                bare.append(f"{rel}:{node.lineno} {node.func.id}")
    return bare


def test_every_error_names_a_field_besides_the_problem() -> None:
    assert _bare_constructions() == []


@pytest.mark.parametrize(
    ("fields", "text"),
    [
        (ErrorFields("is corrupt"), "is corrupt"),
        (ErrorFields("is corrupt", path="a.pt", fix="re-save it"), "a.pt: is corrupt; re-save it"),
        (
            ErrorFields("has a different shape", "a.pt", "layer 'bn'", "(4,)", "(2,)", "pass one model"),
            "a.pt: layer 'bn': has a different shape: expected (4,), found (2,); pass one model",
        ),
        (ErrorFields("is too small", where="--batch-size", found="0"), "--batch-size: is too small: found 0"),
        (ErrorFields("is missing", expected="a file"), "is missing: expected a file"),
    ],
)
def test_one_formatting_rule(fields: ErrorFields, text: str) -> None:
    assert format_message(fields) == text
    raised = InputError(
        fields.problem,
        path=fields.path,
        where=fields.where,
        expected=fields.expected,
        found=fields.found,
        fix=fields.fix,
    )
    assert str(raised) == text and raised.fields == fields
