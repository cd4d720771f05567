"""User-facing errors: each names the problem and the fix, and maps to a non-zero exit."""


class PPRuntimeError(Exception):
    """Base for errors caused by the user's input rather than a bug."""


class ConfigError(PPRuntimeError):
    """A configuration value or override is wrong."""


class CheckpointError(PPRuntimeError):
    """A checkpoint is missing, incomplete or does not match the model configuration."""


class InputError(PPRuntimeError):
    """A prompt or input file line cannot be processed."""


class TrainingError(PPRuntimeError):
    """Training cannot go on (a non-finite loss or gradient norm); nothing of that step is saved."""
