"""The fixture trees are data: pytest must not walk them (their sysfs-like symlinks loop)."""

collect_ignore_glob = ["*"]
