""" `timm-tract` command line: help texts, exit codes. (User errors of every subcommand: tests/test_errors.py.) """
import argparse
import re

import pytest

from timm_tract.cli import build_parser, main


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    sub = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize('command', ['data', 'train', 'compare', 'publish'])
def test_every_help_states_each_default_once(command, monkeypatch):
    monkeypatch.setenv('COLUMNS', '2000')  # one line per option
    text = _subparsers(build_parser())[command].format_help()
    options = [line for line in text.splitlines() if line.lstrip().startswith('-')]
    assert options
    for line in options:
        assert line.count('(default') <= 1, line
        assert not re.search(r'\(default: (None|)\)', line), line
    if command == 'compare':  # train flags it refuses say what to use instead
        refused = [line for line in options if line.split()[0] in ('--epochs', '--seed')]
        assert len(refused) == 2 and all('--budgets' in line or '--seeds' in line for line in refused), refused


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        main(['--help'])
    assert e.value.code == 0 and 'compare' in capsys.readouterr().out


def test_unknown_flag_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(['publish', 'run', '--repo-id', 'me/x', '--no-such-flag'])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and 'unrecognized arguments: --no-such-flag' in err[0]


def test_user_error_inside_a_subcommand_is_one_line_exit_2(capsys, monkeypatch):
    """A TimmTractError raised by the subcommand's own code (not by argparse): exit 2, one line, no traceback."""
    monkeypatch.delenv('TIMM_TRACT_DEBUG', raising=False)
    assert main(['data', '--source', '/nonexistent']) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ['timm-tract data: error: --source and --subset apply to `timm-tract data fashion-mnist` only.']


@pytest.mark.parametrize('value, shown', [('0', False), ('false', False), ('', False), ('1', True), ('yes', True)])
def test_debug_env_shows_the_traceback_only_when_on(capsys, monkeypatch, value, shown):
    monkeypatch.setenv('TIMM_TRACT_DEBUG', value)
    assert main(['data', '--source', '/nonexistent']) == 2
    assert ('Traceback' in capsys.readouterr().err) == shown


def test_sigterm_exit_code_is_143(capsys, monkeypatch):
    """errors.Terminated raised inside a subcommand (what compare's SIGTERM handler raises): 128 + 15."""
    import signal
    import timm_tract.cli as cli
    from timm_tract.errors import Terminated

    def stopped(args):
        raise Terminated(signal.SIGTERM)
    monkeypatch.setattr(cli, '_run_data', stopped)
    assert main(['data']) == 143
    assert capsys.readouterr().err.strip() == 'timm-tract data: stopped by SIGTERM'
