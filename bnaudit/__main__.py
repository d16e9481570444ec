"""``python -m bnaudit``: the command line."""

from bnaudit.cli import run

if __name__ == "__main__":
    run()
