"""``python -m bnaudit``: the command line."""

from bnaudit.cli import main

if __name__ == "__main__":
    main()
