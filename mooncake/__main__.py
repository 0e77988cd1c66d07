import sys

from mooncake.cli import main

sys.exit(main())
