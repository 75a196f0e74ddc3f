"""Typed config loading: nested dataclasses, tuples, unknown keys rejected."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from clip3d_core.cli import main as cli_main
from clip3d_core.config import ConfigError, from_dict, load_yaml, to_dict


@dataclass
class Inner:
    size: float = 0.1
    shape: tuple[int, int, int] = (1, 2, 3)


@dataclass
class Outer:
    name: str = "x"
    inner: Inner = field(default_factory=Inner)
    tags: list[str] = field(default_factory=list)
    limit: int | None = None


def test_nested_round_trip(tmp_path: Path) -> None:
    cfg = from_dict(Outer, {"name": "a", "inner": {"size": 1, "shape": [4, 5, 6]}, "tags": ["t"]})
    assert cfg.inner.size == 1.0 and isinstance(cfg.inner.size, float)
    assert cfg.inner.shape == (4, 5, 6)
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert load_yaml(Outer, path) == cfg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"nmae": "typo"}, "unknown key"),
        ({"inner": {"shape": [1, 2]}}, "expected 3 values"),
        ({"name": 3}, "expected str"),
        ({"inner": 5}, "expected a mapping"),
        ({"inner": {"size": "abc"}}, "expected a number"),
        ({"inner": {"size": True}}, "expected a number"),
        ({"limit": True}, "expected int"),
    ],
)
def test_bad_config_names_the_problem(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(Outer, data)


def test_cli_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main([]) == 0
    out = capsys.readouterr().out
    for command in ("segment", "bench", "train", "evaluate", "replay", "label-bag", "make-bag"):
        assert command in out
    assert cli_main(["no-such-command"]) == 2
