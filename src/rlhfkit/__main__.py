from rlhfkit.cli import entry

entry()
