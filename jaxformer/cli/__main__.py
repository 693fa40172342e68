"""``python -m jaxformer.cli``: the ``jaxformer`` command under this interpreter, for
subprocesses (sweep runs, tests) that must not depend on the script being on PATH."""

import sys

from jaxformer.cli.main import main

sys.exit(main())
