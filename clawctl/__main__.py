"""`python -m clawctl` runs the CLI."""

from clawctl.cli import main

main()
