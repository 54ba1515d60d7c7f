"""The ``imaged`` command: argument parsing, the daemon client and progress display."""
