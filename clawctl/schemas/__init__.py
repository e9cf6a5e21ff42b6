"""Wire types: everything that crosses the HTTP boundary or is printed by `--json`."""
