"""Meta-tests: every hookspec is exercised by a test and documented with its exact
signature in docs/hooks.md, and so are the fields of RouteSpec and Call."""

from __future__ import annotations

import dataclasses
import inspect
import re
from pathlib import Path

import pytest

from scaiproxy import Call, RouteSpec, hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKS_DOC = ROOT / "docs" / "hooks.md"
TESTS = Path(__file__).resolve().parent


def hookspec_functions() -> list:
    return [
        function
        for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("scaiproxy_")
        and getattr(function, "scaiproxy_spec", None) is not None
    ]


HOOKS = hookspec_functions()


def signature_line(function) -> str:
    """Write the spec as a ``def`` line, from its string annotations."""
    signature = inspect.signature(function)
    arguments = ", ".join(
        f"{name}: {parameter.annotation}"
        for name, parameter in signature.parameters.items()
    )
    prefix = "async def" if inspect.iscoroutinefunction(function) else "def"
    return f"{prefix} {function.__name__}({arguments}) -> {signature.return_annotation}"


def section(text: str, heading: str) -> str:
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    return match.group(1) if match else ""


def test_hookspecs_found():
    names = {function.__name__ for function in HOOKS}
    assert {"scaiproxy_configure", "scaiproxy_routes", "scaiproxy_startup"} <= names


@pytest.mark.parametrize("hook", HOOKS, ids=lambda hook: hook.__name__)
def test_hook_exercised_by_tests(hook):
    """Some test outside this file implements the hook."""
    implementation = re.compile(rf"def {hook.__name__}\(")
    users = [
        path.name
        for path in TESTS.rglob("test_*.py")
        if path.name != Path(__file__).name
        and implementation.search(path.read_text(encoding="utf-8"))
    ]
    assert users, f"no test implements {hook.__name__}"


@pytest.mark.parametrize("hook", HOOKS, ids=lambda hook: hook.__name__)
def test_hook_documented_with_signature(hook):
    text = section(HOOKS_DOC.read_text(encoding="utf-8"), hook.__name__)
    assert text, f"docs/hooks.md has no '## {hook.__name__}' section"
    assert signature_line(hook) in text


@pytest.mark.parametrize("hook", HOOKS, ids=lambda hook: hook.__name__)
def test_hook_section_has_example(hook):
    text = section(HOOKS_DOC.read_text(encoding="utf-8"), hook.__name__)
    assert "@hookimpl" in text


@pytest.mark.parametrize("hook", HOOKS, ids=lambda hook: hook.__name__)
def test_hook_docstring_says_when(hook):
    assert "Called" in (hook.__doc__ or "") or "awaited" in (hook.__doc__ or "")


@pytest.mark.parametrize(
    "model, heading",
    [(RouteSpec, "RouteSpec"), (Call, "Call")],
    ids=["RouteSpec", "Call"],
)
def test_fields_documented(model, heading):
    text = section(HOOKS_DOC.read_text(encoding="utf-8"), heading)
    missing = [
        field.name
        for field in dataclasses.fields(model)
        if f"| `{field.name}` |" not in text
    ]
    assert missing == []


def test_no_undocumented_hook_sections():
    """Every hook heading in the page names a real hookspec."""
    names = {function.__name__ for function in HOOKS}
    headings = re.findall(
        r"^## (scaiproxy_\w+)", HOOKS_DOC.read_text(encoding="utf-8"), re.M
    )
    assert set(headings) == names
