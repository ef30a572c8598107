"""Model swap while serving: a new file is loaded, checked and warmed up beside the serving one, then switched to.

- :mod:`service.swap.checks`: the checks a new model must pass (contract, warm-up, canary images).
- :mod:`service.swap.reloader`: one reload at a time, each step named when it fails; the switch.
- :mod:`service.swap.watch`: the optional file watcher (``LESIONSERVE_MODEL_WATCH``).
- :mod:`service.swap.admin`: ``POST /v1/admin/models/reload`` (admin API keys only).

SIGHUP is wired in :mod:`service.__main__`. Any failure leaves the serving model untouched.
"""
