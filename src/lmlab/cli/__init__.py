"""The `lmlab` command line: one module per command group, all registered in main.py."""
