"""`python -m bench`, as `make bench` runs it."""

import sys

from bench.bench import main

sys.exit(main())
