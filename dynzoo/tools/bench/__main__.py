"""``python -m dynzoo.tools.bench`` = ``dynzoo bench``."""
import sys

from dynzoo.tools.bench import main

sys.exit(main())
