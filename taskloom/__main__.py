"""``python -m taskloom``: the same command line as the ``taskloom`` console script."""
import atexit
import os
import sys

_status: list[int] = []


def _exit_interrupted() -> None:
    # Under ``python -m`` (not the console script, which ends through Py_Exit), CPython ends the
    # process by SIGINT instead of with the returned status once a KeyboardInterrupt has escaped
    # code that exec()/eval() ran from a string -- a dataclass's generated __init__ or a
    # namedtuple created during an import, where an early Ctrl-C often lands -- even though
    # main() caught it (Modules/main.c checks its "unhandled KeyboardInterrupt" flag after
    # finalisation). Registered before anything else, this runs after every other atexit handler
    # and ends an interrupted run with 130, as the console script does.
    if _status == [130]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)


atexit.register(_exit_interrupted)

from taskloom.cli import main  # noqa: E402  (after the handler: it must be registered first)

_status.append(main())
sys.exit(_status[0])
