"""`python -m hybridserve.cli`, as the tests run the command."""

import sys

from hybridserve.cli.main import main

sys.exit(main())
