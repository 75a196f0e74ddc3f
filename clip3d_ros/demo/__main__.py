"""`python -m clip3d_ros.demo` (what `make demo` runs)."""

import sys

from clip3d_ros.demo.cli import main

sys.exit(main())
