"""Errors the command line reports as one clear line instead of a traceback."""


class PipelineError(Exception):
    """A failure with a message that already says what went wrong and how to fix it."""

    exit_code = 1


class UserError(PipelineError):
    """A mistake in the user's input (parameters, config, data, run ids): exit status 2."""

    exit_code = 2


class DivergenceError(PipelineError):
    """Training produced a NaN or infinite loss; the run is marked FAILED."""
