import sys

from datatailor.cli import main

sys.exit(main())
