"""Budget-aware inference strategies (budget forcing, voting, PDR, tree search, cascades, routing).

Strategies use backends only through the :class:`~budgetlm.backends.base.Backend` protocol and
charge every call to a :class:`~budgetlm.meter.Meter`.  Plain sampling lives in
:mod:`budgetlm.strategies.sample`; the other strategies are added by later releases.
"""
