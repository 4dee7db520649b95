"""Long commands draw a progress bar on a terminal, and nothing where stderr is not one (CI, logs)."""

import io

import pytest

from merging import MergeConfig, merge


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("stream", [Terminal, io.StringIO], ids=["terminal", "log"])
def test_a_merge_shows_its_tensors_on_a_terminal_only(zoo, tmp_path, monkeypatch, stream):
    stderr = stream()
    monkeypatch.setattr("sys.stderr", stderr)
    merge(MergeConfig(base=zoo["base"], experts=zoo["experts"][:2], method="average"), tmp_path / "out")
    drawn = stderr.getvalue()
    if stream is Terminal:
        assert drawn.startswith("\rmerge:") and "tensor/s]" in drawn  # drawn, then cleared (leave=False)
    else:
        assert drawn == ""
