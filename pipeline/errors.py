"""The one error type a user can cause; the CLI prints it as a single line."""


class GenddError(Exception):
    """A problem with the user's input (spec, path, cache, options); the message says what to do."""


def require(ok: bool, option: str, rule: str, value: object) -> None:
    """Refuse an option value outside its range: `--option must be <rule>, got <value>` (checked before any work)."""
    if not ok:
        raise GenddError(f"--{option.replace('_', '-')} must be {rule}, got {value!r}")


def require_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    """Refuse a string option that is not one of `choices`, listing them."""
    require(value in choices, option, f"one of {', '.join(choices)}", value)
