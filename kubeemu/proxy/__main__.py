"""``python -m kubeemu.proxy``: see :mod:`kubeemu.proxy.main`."""

import sys

from kubeemu.proxy.main import main

sys.exit(main())
