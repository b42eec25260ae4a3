"""`python -m linmem`: the command line (see `linmem.cli`)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
