"""`python -m loadtests run | search | report` (loadtests/run.py) and `sim | calibrate | plan | fit-profile`
(loadtests/sim/cli.py)."""

import sys

from loadtests.run import main

if __name__ == "__main__":
    sys.exit(main())
