"""Run the hadaconv CLI inside the test process (a subprocess would spend seconds importing)."""

from __future__ import annotations

from hadaconv.cli import main


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``hadaconv ARGS...`` with pytest's ``capsys``: (exit status, stdout, stderr)."""
    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out, err = capsys.readouterr()
    return code, out, err
