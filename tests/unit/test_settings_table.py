"""Each default is written once (issue 12, point 5): in the pipelines' config dataclasses,
which the settings model takes its defaults from; the README's settings table is checked
against the model: every setting has a row, and the row states the model's default."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, SecretStr

from pipelines.session import SessionConfig
from server.engines import session_config
from server.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"
# defaults computed at start-up (a folder of the user's, a random id) or too long for a table
# cell: the row describes them in words
DESCRIBED = {"auth.state_dir", "models.cache_dir", "mqtt.client_id", "llm.system_prompt"}
NONE = {"none", "–", "-"}


@pytest.fixture(autouse=True)
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults alone: no VOXLENS_* variable of the machine running the tests."""
    for key in list(os.environ):
        if key.startswith("VOXLENS_"):
            monkeypatch.delenv(key)


def table() -> dict[str, str]:
    """Each setting named in the first column, with its default cell (a row naming several
    settings, "`a` / `b`", gives each its part of "x / y")."""
    rows: dict[str, str] = {}
    for line in README.read_text("utf-8").splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        names = re.findall(r"`([a-z_]+(?:\.[a-z_]+)?)`", cells[0])
        parts = [p.strip() for p in cells[1].split(" / ")]
        for i, name in enumerate(names):
            rows[name] = parts[i] if len(parts) == len(names) else cells[1]
    return rows


def spelled(value: Any) -> set[str] | None:
    """How a default may be written in the table (None: any words will do)."""
    if value is None or value == "":
        return NONE
    if isinstance(value, bool):
        return {str(value).lower()}
    if isinstance(value, float) and value.is_integer():
        return {str(int(value)), str(value)}
    if isinstance(value, (list, dict, SecretStr)):
        return None
    return {str(value)}


def settings() -> dict[str, Any]:
    """Every setting by its dotted name, with its default."""
    defaults = Settings()
    out: dict[str, Any] = {}
    for name in Settings.model_fields:
        value = getattr(defaults, name)
        if isinstance(value, BaseModel):
            out.update({f"{name}.{field}": getattr(value, field)
                        for field in type(value).model_fields})
        else:
            out[name] = value
    return out


def test_every_setting_has_a_row_in_the_readme() -> None:
    rows = table()
    assert [name for name in settings() if name not in rows] == []


def test_each_row_states_the_models_default() -> None:
    rows = table()
    wrong = []
    for name, value in settings().items():
        forms = spelled(value)
        if name in DESCRIBED or forms is None or name not in rows:
            continue
        cell = rows[name].replace("`", "")
        if not any(cell == form or cell.startswith(form + " ") for form in forms):
            wrong.append(f"{name}: the model says {value!r}, the README {rows[name]!r}")
    assert wrong == []


def test_the_table_names_no_setting_that_does_not_exist() -> None:
    known = set(settings())
    sections = {name.split(".")[0] for name in known}
    stray = [name for name in table() if "." in name and name.split(".")[0] in sections
             and name not in known]
    assert stray == []


def test_the_default_settings_make_the_default_session_config() -> None:
    """Settings take their defaults from the pipelines' config dataclasses; what the default
    settings build (server/engines.session_config) is then exactly the default config."""
    assert session_config(Settings()) == SessionConfig()
