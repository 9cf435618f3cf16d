"""Placeholder: `simulate` and `show` subcommands are registered here (issue 2)."""


def register(sub) -> None:
    """Add the simulate/show subcommands to the data_prep parser."""
