import sys

from sdtorch.cli import main

sys.exit(main())
