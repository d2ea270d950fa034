"""The ``rkekernels`` command line: ``demo``, ``score``, ``compare``, ``evaluate`` and ``bench``.

    rkekernels demo [--samples N] [--prompts P] [--scale G] ...   the ground-truth guidance demo
    rkekernels score PATH [--cond PATH] [--sigma S ...] [--sigma-cond S] [--json] [--key NAME]
    rkekernels compare PATH [PATH ...] [--sigma S] [--sweep N] ... one shared bandwidth
    rkekernels evaluate GEN [--reference REF] [--prompts FILE] ...  images -> scores, report
    rkekernels bench [--only NAME ...] [--full]                   the benchmark tables, here

One module per subcommand (`rkekernels.cli.score`, ``compare``, ``evaluate``, ``demo``,
``bench``), each with its ``add_arguments(parser)`` and ``run(args)``; the report of ``evaluate
--out`` is `rkekernels.cli.report`. Files are read by `load_array` (.npy, .npz, .pt/.pth,
.safetensors), shared with `rkekernels.evaluation`.

Bad input (a missing or unreadable file, a wrong shape, NaN/Inf, different n) prints one line on
stderr and exits with code 2, without a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Sequence

from .. import __version__
from .._errors import CLIError
from .._files import load_array
from . import bench, compare, demo, evaluate, score
from ._common import EXIT_BAD_INPUT, PROG, _Parser
from .bench import BENCH_SCRIPTS
from .score import score_files

__all__ = ["BENCH_SCRIPTS", "load_array", "main", "score_files"]

#: the subcommands, in the order ``rkekernels --help`` lists them
COMMANDS = {"demo": demo, "score": score, "compare": compare, "evaluate": evaluate, "bench": bench}


#: exit code after a closed pipe on stdout (128 + SIGPIPE, as a shell reports it)
EXIT_BROKEN_PIPE = 141
_WRITE_ERRORS = {errno.EPIPE, errno.ENOSPC, errno.EIO, errno.EFBIG, errno.EDQUOT}


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the buffered rest is not flushed again at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # no file descriptor (captured in tests)
        pass


def _parser() -> _Parser:
    """The parser: one subparser per module of `COMMANDS`, built by its ``add_arguments``."""
    p = _Parser(prog=PROG, description="Exact RKE diversity scores and SPARKE guidance.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(
        dest="command", metavar="{" + ",".join(COMMANDS) + "}", parser_class=_Parser
    )
    for name, module in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``rkekernels`` console script; returns the exit code.

    0 on success, 2 on bad input or usage (one line on stderr, no traceback), 1 when a benchmark
    script fails or the output cannot be written (one line: a full disk), 141 (quietly) when the
    reader of stdout closed the pipe (``... | head``).

    Example:
        >>> from rkekernels.cli import main
        >>> main(["score", "no/such/file.npy"])
        2
    """
    parser = _parser()
    with contextlib.suppress(AttributeError, ValueError):  # a file name that is not UTF-8
        sys.stdout.reconfigure(errors="backslashreplace")  # prints as \udcXX, never raises
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_BAD_INPUT
        code = COMMANDS[args.command].run(args)
        sys.stdout.flush()  # a full disk shows here, not at exit
        return code
    except BrokenPipeError:  # `rkekernels ... | head`: the reader is gone, nothing to say
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:
        if exc.filename is not None or exc.errno not in _WRITE_ERRORS:
            raise
        _drop_stdout()
        print(f"{PROG}: error: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except CLIError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
