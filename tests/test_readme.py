"""The README's Python examples run as written, in order, in one namespace."""

import contextlib
import io
import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README should carry a runnable tour"
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    assert namespace["out"].shape == (2, 128, 8, 64)
    assert namespace["y"].shape == (2, 128, 64)
    # The printed mask pictures are the ones the README shows.
    assert "[[1 0 0 0 0 0]\n [1 1 0 0 0 0]" in printed.getvalue()
    assert "xla: the [B, N, T, S] scores take 1 MiB" in printed.getvalue()
