"""The ``reidx`` commands, one module per area; ``cli.py`` holds the group and registers them."""
