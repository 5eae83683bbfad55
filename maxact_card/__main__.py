"""`python -m maxact_card` and the `maxact-card` command.

Importing the command line takes seconds (torch); a Ctrl-C in that time is one line, like every
other interruption, so nothing heavy is imported before the handler is in place. Python drops a
KeyboardInterrupt raised inside a finaliser (`__del__`) with a note on stderr and carries on, so
an interrupted run could finish and exit 0: the handler also remembers the signal, and a run it
interrupted never exits 0.
"""

from __future__ import annotations

import signal
import sys

_EXIT_RUNTIME = 3  # errors.EXIT_RUNTIME, not imported: this module imports nothing of ours up front


def main() -> None:
    """Console-script entry point (see `maxact_card.cli.main`)."""
    interrupted: list[int] = []

    def on_interrupt(signum: int, frame: object) -> None:
        interrupted.append(signum)
        raise KeyboardInterrupt

    def unraisable(info: sys.UnraisableHookArgs) -> None:
        if not isinstance(info.exc_value, KeyboardInterrupt):  # the dropped interrupt is remembered above
            sys.__unraisablehook__(info)

    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_interrupt)
        sys.unraisablehook = unraisable
    try:
        from maxact_card.cli import main as run

        run()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(_EXIT_RUNTIME)
    except SystemExit as done:
        if interrupted and done.code in (0, None):
            print("error: interrupted", file=sys.stderr)
            sys.exit(_EXIT_RUNTIME)
        raise


if __name__ == "__main__":
    main()
