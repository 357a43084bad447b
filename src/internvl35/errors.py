"""Exception types. The CLI turns each into one line and a non-zero exit (traceback only with --debug)."""


class InternVLError(Exception):
    """Base class for every error this package raises on bad input."""


class UnsupportedArchitectureError(InternVLError):
    """The checkpoint or preset names an architecture this package cannot build."""


class CheckpointError(InternVLError):
    """A checkpoint directory is incomplete or inconsistent (missing/unexpected keys, shapes, files)."""


class InputError(InternVLError):
    """A user input (image, video, prompt, sampling value) cannot be used; the message says why."""
