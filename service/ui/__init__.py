"""The page at ``/`` for clinicians and integrators (static files + :mod:`service.ui.static`) and the
model card route (:mod:`service.ui.card`, with its safe Markdown renderer :mod:`service.ui.markdown`)."""
