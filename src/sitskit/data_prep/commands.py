"""Placeholder: `pastis`, `mtlcc` and `info` subcommands are registered here (issue 3)."""


def register(sub) -> None:
    """Add the conversion subcommands to the data_prep parser."""
