"""Bad-input corpus: every user error of every ``qeff-graph`` command exits 2 with one ``error:``
line, no traceback, nothing left behind and the user's files untouched (see test_bad_inputs.py)."""
