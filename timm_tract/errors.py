""" timm-tract's exceptions: one base class for every user error, each subclass also the built-in it replaces.

A `TimmTractError` means "the input or the environment is wrong, and the message says how to fix it" (a bad λ, a
missing data folder, a run directory that cannot be resumed, a Hub call that kept failing). The command line turns
these into one line on stderr and exit code 2; anything else is a programming error and keeps its traceback.
Each subclass also derives from the built-in exception that code written against earlier versions catches
(`except ValueError`, `except RuntimeError`, `except FileExistsError` keep working).
"""

__all__ = [
    'TimmTractError', 'TrActArgumentError', 'TrActTypeError', 'NotPositiveDefiniteError',
    'DataError', 'OutputExistsError', 'RunDirError', 'TrainError', 'CompareError', 'PublishError', 'Terminated',
]


class TimmTractError(Exception):
    """Base class of every error timm-tract raises on bad input or a failing environment."""


class TrActArgumentError(TimmTractError, ValueError):
    """A bad TrAct setting: λ out of range, a layer path that does not exist, a model/optimizer combination."""


class TrActTypeError(TimmTractError, TypeError):
    """A TrAct argument of the wrong type (λ not a real number, `layer` not a path, a layer TrAct does not cover)."""


class NotPositiveDefiniteError(TimmTractError, RuntimeError):
    """The system XᵀX/N + λI could not be factorized (non-finite inputs, or a finite input scale too large)."""


class DataError(TimmTractError, ValueError):
    """A data set that cannot be used as given (missing files, empty splits, a folder that is not ours)."""


class OutputExistsError(TimmTractError, FileExistsError):
    """An output location already holds something that would be overwritten."""


class RunDirError(TimmTractError, ValueError):
    """A run directory (train.py layout) whose files cannot be read: invalid args.yaml or summary.csv."""


class TrainError(TimmTractError, ValueError):
    """A `timm-tract train` setting or run directory that cannot be trained or resumed as given."""


class CompareError(TimmTractError, ValueError):
    """A `timm-tract compare` setting that cannot be compared as given."""


class PublishError(TimmTractError, RuntimeError):
    """A run that cannot be published as given, or a Hub call that kept failing."""


class Terminated(KeyboardInterrupt):
    """The process was asked to stop by a signal (SIGTERM from a job scheduler or `timeout`): like Ctrl-C's
    KeyboardInterrupt (which it derives from, so cleanup written for Ctrl-C runs), not an error of the input. The
    command line exits with 128 + `signum`."""

    def __init__(self, signum: int):
        super().__init__(f'stopped by signal {signum}')
        self.signum = signum
