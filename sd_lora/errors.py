"""The one exception type for a user's mistake.

Anything a user can fix by changing a config value, a path or an installed package raises
`UserError` with a message that names the bad value and the fix. `launch.py` prints that
message alone (no traceback) and exits with status 2; everything else is a bug and keeps
its traceback.
"""


class UserError(ValueError):
    """A mistake in the config, the files on disk or the environment, with its fix."""


def user_message(exc: BaseException) -> str:
    """The message of a UserError, also when a DataLoader worker re-raised it with a traceback inside."""
    text = str(exc)
    marker = "UserError: "
    if "Original Traceback" in text and marker in text:
        text = text.rsplit(marker, 1)[1].strip()
    return f"error: {text}"
