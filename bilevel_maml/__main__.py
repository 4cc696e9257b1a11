import sys

from bilevel_maml.cli import main

sys.exit(main())
