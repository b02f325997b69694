"""Default paths of the pinned rules and the suites: a source checkout, or an installed package."""

from __future__ import annotations

from pathlib import Path

from ratchet.settings import REPO_ROOT, Settings, config_dir


def write_config(root: Path) -> Path:
    (root / "suites").mkdir(parents=True)
    (root / "behavior_rules.json").write_text('{"rules": ["Never make things up."]}')
    return root


def test_a_source_checkout_uses_its_own_config(tmp_path: Path) -> None:
    checkout = write_config(tmp_path / "repo" / "config").parent
    installed = write_config(tmp_path / "prefix" / "share" / "ratchet" / "config")

    assert config_dir(checkout, tmp_path / "prefix") == checkout / "config"
    assert installed.exists()  # present, but the checkout wins


def test_an_installed_package_uses_the_config_it_installed(tmp_path: Path) -> None:
    """pip puts pyproject's data-files under <prefix>/share/ratchet/config; site-packages has
    no config/ beside the package."""
    installed = write_config(tmp_path / "prefix" / "share" / "ratchet" / "config")

    assert config_dir(tmp_path / "site-packages", tmp_path / "prefix") == installed


def test_here_the_defaults_point_at_the_repository_config() -> None:
    settings = Settings()
    assert settings.rules_path == REPO_ROOT / "config" / "behavior_rules.json"
    assert settings.suites_dir == REPO_ROOT / "config" / "suites"
    assert settings.rules_path.is_file() and (settings.suites_dir / "demo.json").is_file()
