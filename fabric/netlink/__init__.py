"""The netlink dataplane: one owner per kernel table behind one narrow kernel interface.

``dataplane`` (the :class:`Dataplane` protocol and :class:`KernelDataplane`), ``rawnl`` (the
batched raw codec for the hot path), ``fake`` (a stateful fake kernel for unit tests), the table
owners (``links``, ``addresses``, ``rules``, ``neighbours``, ``fdb``, ``routes``), ``reconciler``
(the ordered pass over all of them) and ``events`` (netlink notifications of drift).
"""
