"""``python -m emnist.p2p peer ...``: the p2p group of the emnist CLI (how `p2p run` starts
its peer processes)."""

import sys

from emnist.cli import main

if __name__ == "__main__":
    main(args=["p2p", *sys.argv[1:]], prog_name="emnist")
