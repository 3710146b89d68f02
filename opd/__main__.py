"""`python -m opd`: the same entry point as the `opd` console script."""

from opd.launch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
