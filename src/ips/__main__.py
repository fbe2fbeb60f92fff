"""``python -m ips`` runs the command-line interface."""

from ips.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
