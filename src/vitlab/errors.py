"""The one exception type vitlab raises for problems a user can fix."""


class VitlabError(ValueError):
    """A user-facing error: the message names the bad value and what is allowed instead."""
