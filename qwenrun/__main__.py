"""`python -m qwenrun` runs the same CLI as the `qwenrun` console script."""

from qwenrun.cli import main

main()
