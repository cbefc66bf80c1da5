"""python -m sdtorch.serve [options]: the same as `sdtorch serve`."""

import sys

from sdtorch.serve.server import main

sys.exit(main())
