"""`python -m imichat_async.cli`: the same as the `imichat-async` command."""

from . import main

if __name__ == "__main__":
    main()
