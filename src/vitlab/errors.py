"""The one exception type vitlab raises for problems a user can fix, and a check that raises it."""


class VitlabError(ValueError):
    """A user-facing error: the message names the bad value and what is allowed instead."""


def check_choice(name: str, value: object, allowed: tuple) -> None:
    """Raise a VitlabError naming `name` when `value` is not one of `allowed`."""
    if value not in allowed:
        raise VitlabError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")
