import sys

from carbond.cli import main

sys.exit(main())
