"""`python -m loadtests run | search | report` (see loadtests/run.py)."""

import sys

from loadtests.run import main

if __name__ == "__main__":
    sys.exit(main())
