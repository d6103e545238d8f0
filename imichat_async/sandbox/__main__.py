"""`python -m imichat_async.sandbox`: the `sandbox` command (see `cli`)."""

from .cli import sandbox_command

if __name__ == "__main__":
    sandbox_command()
