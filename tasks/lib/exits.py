"""Exit statuses every command shares (each command's docstring lists its own others)."""

EXIT_USAGE = 2  # bad flags, config or cluster state: nothing was touched
