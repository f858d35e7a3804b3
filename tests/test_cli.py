"""The command line as a user meets it: --help at once (torch not imported), the presets listed
with what they run, and user errors as one line with exit status 2 (a traceback with --debug)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from m2mkd_fast.cli import build_parser, main

REPO = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_every_help_and_presets_import_no_torch():
    phases = sorted(build_parser()._subparsers._group_actions[0].choices)
    code = (
        "import sys\n"
        "from m2mkd_fast.cli import main\n"
        f"for argv in [['--help']] + [[p, '--help'] for p in {phases!r}]:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as e:\n"
        "        assert e.code == 0, argv\n"
        "assert main(['presets']) == 0\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    r = _python(code)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "reproduce" in r.stdout and "--run-dir" in r.stdout
    assert "quick: every phase at tiny budgets" in r.stdout and "min on 2 CPU cores" in r.stdout


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("m2mkd-fast: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


def test_unknown_config_key_is_one_line_and_status_2(capsys):
    assert main(["show-config", "--set", "log.everyy=0"]) == 2
    assert "did you mean 'log.every'" in _one_error_line(capsys)


def test_binary_config_file_is_one_line_and_status_2(tmp_path, capsys):
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(bytes(range(128, 256)))
    assert main(["show-config", "--config", str(binary)]) == 2
    assert "utf-8" in _one_error_line(capsys).lower()


def test_bad_option_value_is_one_line_and_status_2(tmp_path, capsys):
    assert main(["distill", "--config", "quick", "--run-dir", str(tmp_path), "--student", "nac", "--module", "x"]) == 2
    assert "--module must be an integer or 'all'" in _one_error_line(capsys)


def test_unwritable_run_dir_names_the_path(tmp_path, capsys):
    in_the_way = tmp_path / "a_file"
    in_the_way.write_text("")
    run_dir = in_the_way / "run"
    assert main(["pretrain-meta", "--config", "quick", "--run-dir", str(run_dir), "--no-progress"]) == 2
    assert str(run_dir) in _one_error_line(capsys)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_read_only_run_dir_is_one_line_and_status_2(tmp_path, capsys):
    tmp_path.chmod(0o500)
    try:
        assert main(["pretrain-meta", "--config", "quick", "--run-dir", str(tmp_path / "run"), "--no-progress"]) == 2
    finally:
        tmp_path.chmod(0o700)
    assert str(tmp_path / "run") in _one_error_line(capsys)


def test_debug_shows_the_traceback():
    from m2mkd_fast.distill.config import ConfigError

    with pytest.raises(ConfigError, match="log.everyy"):
        main(["--debug", "show-config", "--set", "log.everyy=0"])
    with pytest.raises(ConfigError, match="log.everyy"):
        main(["show-config", "--set", "log.everyy=0", "--debug"])
