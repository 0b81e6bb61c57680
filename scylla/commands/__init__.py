"""The ``scylla`` command line (``cli``) and its subcommands, one module each: the stage shells
(``hidden_states``, ``train``, ``bench`` = the decode stage, ``fit``), ``validate``, ``sweep``,
``report``, ``export``, ``generate``, ``targets``, ``main`` (the default job) and the MLproject
entry points (``mlproject``). The top floor: nothing in the package imports it.
"""
