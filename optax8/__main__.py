import sys

from optax8.diagnostics import main

sys.exit(main())
