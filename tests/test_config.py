"""The settings: one class, documented, refusing what cannot work."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from devtools.controlplane import REPO_ROOT
from ephemera.config import Settings


def test_every_setting_is_in_the_readme_table() -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    missing = [
        f"EPHEMERA_{name.upper()}" for name in Settings.model_fields if f"| `EPHEMERA_{name.upper()}` |" not in readme
    ]
    assert missing == []


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"EPHEMERA_MAX_CPU": "lots"}, "EPHEMERA_MAX_CPU"),
        ({"EPHEMERA_WEBHOOK_PORT": "70000"}, "webhook_port"),
        ({"EPHEMERA_SOFT_TIME_LIMIT": "100", "EPHEMERA_HARD_TIME_LIMIT": "10"}, "SOFT_TIME_LIMIT"),
        ({"EPHEMERA_NAMESPACE_PREFIX": "Not_DNS"}, "namespace_prefix"),
        ({"EPHEMERA_WEBHOK_SECRET": "typo"}, "unknown setting.*EPHEMERA_WEBHOK_SECRET"),
    ],
)
def test_bad_settings_are_refused(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], complaint: str) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError, match=complaint):
        Settings()


def test_secrets_are_not_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EPHEMERA_WEBHOOK_SECRET", "s3cr3t")
    monkeypatch.setenv("EPHEMERA_GITHUB_PRIVATE_KEY", "-----BEGIN KEY-----")
    shown = repr(Settings())
    assert "s3cr3t" not in shown
    assert "BEGIN KEY" not in shown
