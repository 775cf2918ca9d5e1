"""``python -m kubeemu.ctrl``: see :mod:`kubeemu.ctrl.manager`."""

import sys

from kubeemu.ctrl.manager import main

sys.exit(main())
