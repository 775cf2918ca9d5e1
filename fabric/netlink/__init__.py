"""The netlink dataplane: one owner per kernel table behind one narrow kernel interface.

``dataplane`` (the :class:`Dataplane` protocol and :class:`KernelDataplane`), ``rawnl`` (the
batched raw codec for the hot path), ``fake`` (a stateful fake kernel for unit tests), the table
owners (``links``, ``addresses``, ``rules``, ``neighbours``, ``fdb``, ``routes``), ``reconciler``
(the ordered pass over all of them) and ``events`` (netlink notifications of drift).

May import: the shared modules at the ``fabric`` root below the components (``types``,
``netns``); never the control plane, the agent or anything of the lab (import-linter).
"""
