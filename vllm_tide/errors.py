import contextlib
import sys


class TideConfigError(ValueError):
    """A TIDE setting, router file or model is unusable.

    The message is always one sentence that says what is wrong and how to fix it; the plugin's
    exception hook prints only that sentence instead of a traceback through vLLM.
    """


@contextlib.contextmanager
def exit_on_config_error():
    """For scripts: a TideConfigError inside ends the run with its one sentence (exit status 2), not
    with a traceback."""
    try:
        yield
    except TideConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
