"""`python -m timm_supertoken.cli`: the console script, in the form that `torchrun -m` launches."""
import sys

from . import main

sys.exit(main())
