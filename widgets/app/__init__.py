"""The team dashboard (``lens serve``): a Panel app over a shared store, built from the notebook components.

Pages: **Runs** (the team's runs, search and filter; a run → SinkMap, ValleyPlot, AttentionExplorer,
TokenView; two runs → CompareView), **New run** (a configured model and deployment, texts typed or
uploaded → a job with its queue position and progress), **Scans** (→ NeuronExplorer; admins start scans),
**Vision** (vision-language runs → PatchOverlay) and **Admin** (jobs, workers, memory, users, the store).

Start it with ``lens serve`` (see ``docs/serve.md``), or from Python::

    from lens.store.config import ServeConfig
    from lens.widgets.app import serve
    serve(ServeConfig.load("lens-serve.toml"))

The web process serves saved runs; the worker processes (``lens.store.pool``) hold the models.
"""

from .server import check_listen_policy, serve

__all__ = ["serve", "check_listen_policy"]
