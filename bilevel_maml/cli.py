"""The ``bilevel-maml`` console script (also ``python -m bilevel_maml``): the command line is read
by :mod:`bilevel_maml.arguments`, each command runs in :mod:`bilevel_maml.runs`, and bad input
ends as one line and exit status 2, here. :func:`run_script` gives the examples the same behaviour."""

from __future__ import annotations

import contextlib
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from bilevel_maml import distributed
from bilevel_maml.allocator import keep_freed_memory
from bilevel_maml.arguments import BadInput, parse
from bilevel_maml.checkpoint import CheckpointWriteError
from bilevel_maml.runs import command_evaluate, command_plot, command_resume, command_train
from bilevel_maml.stopping import exit_status
from bilevel_maml.validation import PACKAGE_FOLDER, users_line

#: what the library raises for bad input, with a message naming the value and what is allowed
BAD_INPUT_ERRORS = (ValueError, TypeError, FileNotFoundError)


def _bench(argv: list[str]) -> dict:
    """``bilevel-maml bench``: the source checkout's ``benchmarks/meta_iteration.py`` (the comparison
    harness is not part of the installed package)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "meta_iteration.py"
    if not script.is_file():
        raise BadInput("bilevel-maml bench runs benchmarks/meta_iteration.py of a source checkout of bilevel_maml "
                       "(the comparison harness is not installed with the package); clone the repository and "
                       "install it with `pip install -e .`")
    sys.path.insert(0, str(script.parent))
    import meta_iteration

    return meta_iteration.main(argv, prog="bilevel-maml bench")


def run(argv: list[str] | None = None) -> dict:
    """Run one command; returns its result (raises ``SystemExit`` with a message on bad input).

    :param argv: the arguments after ``bilevel-maml`` (default: ``sys.argv[1:]``).
    """
    args = parse(argv)
    command = {"train": command_train, "evaluate": command_evaluate, "resume": command_resume,
               "plot": command_plot, "bench": lambda args: _bench(args.bench_args)}[args.command]
    try:
        result = command(args)
        distributed.shutdown(wait_for_the_others=True)
        return result
    except BAD_INPUT_ERRORS as error:
        raise BadInput(f"bilevel-maml {args.command}: {one_line(error)}") from None
    except (CheckpointWriteError, distributed.RankFailure) as error:
        raise SystemExit(f"bilevel-maml {args.command}: {error}") from None
    finally:
        distributed.shutdown()


def one_line(error: Exception) -> str:
    """The message of a bad-input error, followed, where a user's own code led to it without this
    library raising it (a hook adding a dict to a tensor), by the error's type and that code's line.

    :param error: one of :data:`BAD_INPUT_ERRORS`.
    """
    where = users_line(error)
    return str(error) if where is None else f"{error} ({type(error).__name__} at {where})"


@contextlib.contextmanager
def one_line_warnings(prog: str):
    """Within it, the library's own warnings print as one line each, ``PROG: warning: ...``, as its
    errors do; others (torch's, say) keep Python's format, which names the line that warned.

    :param prog: the name the line starts with.
    """
    python_format = warnings.formatwarning

    def format(message, category, filename, lineno, line=None):
        if Path(filename).resolve().is_relative_to(PACKAGE_FOLDER):
            return f"{prog}: warning: {message}\n"
        return python_format(message, category, filename, lineno, line)

    warnings.formatwarning = format
    try:
        yield
    finally:
        warnings.formatwarning = python_format


def run_script(main: Callable[[], object], prog: str | None = None) -> None:
    """Run a script's ``main()`` the way the ``bilevel-maml`` command runs its commands: bad input
    (the ``ValueError``, ``TypeError`` or ``FileNotFoundError`` the library raises, with its
    message, before any work, or a :class:`OneLineParser`'s error) is printed as one line and exits
    with status 2, Ctrl-C with 130;
    the examples end with ``run_script(main)``.

    :param main: the script's entry point, called with no arguments.
    :param prog: the name the line starts with (default: the script's file name).
    """
    prog = prog or Path(sys.argv[0]).name
    try:
        with one_line_warnings(prog):
            main()
    except BadInput as error:  # already one line, naming its program (a OneLineParser's)
        print(error.code, file=sys.stderr)
        raise SystemExit(2) from None
    except BAD_INPUT_ERRORS as error:
        print(f"{prog}: {one_line(error)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(exit_status(signal.SIGINT)) from None


def main(argv: list[str] | None = None) -> int:
    """The console script: :func:`run`, with bad input printed as one line and exit status 2.

    :param argv: the arguments after ``bilevel-maml`` (default: ``sys.argv[1:]``).
    :returns: the exit status.
    """
    keep_freed_memory()  # this process is ours: reuse freed activations instead of page-faulting them in
    try:
        with one_line_warnings("bilevel-maml"):
            run(argv)
    except BadInput as error:
        print(error.code, file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside meta-training (loading data, the final test): nothing to finish
        print("bilevel-maml: stopped by SIGINT outside meta-training; the run folder's checkpoints are as last "
              "written (`bilevel-maml resume` finishes a run whose test was cut short)", file=sys.stderr)
        return exit_status(signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["BAD_INPUT_ERRORS", "BadInput", "main", "one_line", "one_line_warnings", "run", "run_script"]
