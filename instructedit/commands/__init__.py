"""Subcommands of the ``instructedit`` command line, one module each (add its parser, run it); ``cli.py`` assembles them."""
