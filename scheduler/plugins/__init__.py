"""The scheduler's plugins by name: what a profile (``scheduler.profile``) may enable.

Each plugin module exposes one class with a ``name`` class attribute and a constructor
``(handle: scheduler.framework.Handle, args: Mapping[str, Any])`` (``args`` is the plugin's
``pluginConfig`` entry from the configuration, ``{}`` when there is none), and is listed here
under that name. The extension points it serves follow from the protocols of
``scheduler.framework`` it implements (``filter``, ``score``, ...).
"""

from __future__ import annotations

REGISTRY: dict[str, type] = {}
