"""``python -m emnist.cli ...``: the emnist CLI (how `p2p run` starts its peer processes)."""

from emnist.cli import main

if __name__ == "__main__":
    main(prog_name="emnist")
