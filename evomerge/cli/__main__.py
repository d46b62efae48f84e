"""`python -m evomerge.cli`."""

from evomerge.cli.app import main

main()
