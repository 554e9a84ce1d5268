"""The ``kho`` command line: one module ``cmd_<name>.py`` per subcommand (see main.py)."""
