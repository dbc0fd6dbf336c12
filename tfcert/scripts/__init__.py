"""tfcert's command-line programs: absl flags plus one call into the library each.

Installed as the console scripts ``tfcert-train``, ``tfcert-certify``, ``tfcert-export``
and ``tfcert-attack``; the checkout's ``train.py``, ``certify.py`` and ``export`` call
the same ``main``.
"""
