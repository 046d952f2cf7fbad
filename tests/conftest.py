"""Hypothesis profiles.

``default`` (what ``make test`` and CI run) is derandomized: every run draws the same examples, so
a red CI is a regression of the change under test, never a newly drawn example. ``explore``
(``make explore``) draws fresh random examples, ``PREDICTOPT_EXPLORE`` times as many per property
(see ``tests/_hyp.py``); run it after touching a rule or a property, and pin every counterexample
it finds as an explicit test.
"""

import os

from hypothesis import settings

settings.register_profile("default", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
