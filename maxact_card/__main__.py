"""`python -m maxact_card` and the `maxact-card` command.

Importing the command line takes seconds (torch); a Ctrl-C in that time is one line, like every
other interruption, so nothing heavy is imported before the handler is in place. Python drops a
KeyboardInterrupt raised inside a finaliser (`__del__`) with a note on stderr and carries on, and
libraries turn one into errors of their own: the handler also remembers the signal
(`errors.INTERRUPTS`), and a run it interrupted reports that, whatever it ended with.
"""

from __future__ import annotations

import os
import signal
import sys

_EXIT_RUNTIME = 3  # errors.EXIT_RUNTIME


def main() -> None:
    """Console-script entry point (see `maxact_card.cli.main`)."""
    from maxact_card.errors import INTERRUPTS as interrupted  # a small module of ours, nothing else

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
        _leave(_EXIT_RUNTIME)
    except SystemExit as done:
        if not interrupted:
            if "torch" in sys.modules:
                _leave(_exit_code(done.code))
            raise
        if done.code != _EXIT_RUNTIME:
            print("error: interrupted", file=sys.stderr)
        _leave(_EXIT_RUNTIME)
    except BaseException:
        if not interrupted:  # a real failure outside the command's own error handling
            raise
        print("error: interrupted", file=sys.stderr)  # an import broken by the interrupt, say
        _leave(_EXIT_RUNTIME)


def _exit_code(code: object) -> int:
    """The status `sys.exit(code)` would end the process with (a message goes to stderr, as there)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _leave(code: int) -> None:
    """Exit now, skipping interpreter shutdown. An interrupted run has nothing left to save, and
    libraries' exit hooks could meet the interrupt again and end the process by the signal instead.
    A command that imported torch (one that loaded a model) has written and closed everything it
    writes by the time it returns; tearing down torch, transformers and a GPU's context module by
    module would then add a second or more to every measuring run for nothing (0.5 to 0.9 s on a
    2-core CPU machine, 1.0 to 1.4 s on an H100 machine with an 8B model)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


if __name__ == "__main__":
    main()
