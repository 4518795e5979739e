class TideConfigError(ValueError):
    """A TIDE setting, router file or model is unusable.

    The message is always one sentence that says what is wrong and how to fix it; the plugin's
    exception hook prints only that sentence instead of a traceback through vLLM.
    """
