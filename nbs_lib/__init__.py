"""Jupyter-first reproducible ML workflow: library code exported from notebooks/lib by nbdev

Modules:

- `nbs_lib.scaffold`: `nbs new DEST` (or `make new DEST=... DATA=...`) generates a project with [copier](https://copier.readthedocs.io) from this repository: the same layout, Makefile verbs and README commands, on the team's data file, naming nothing of the worked example. `nbs update` (in the generated project) brings in later template changes with `copier update`, three-way: the team's own edits stay, conflicts are shown inline, never resolved silently.
- `nbs_lib.serving`: The champion behind BentoML: the `serve:` parameters, importing MLflow aliases into BentoML, what `service.py` reads at import, the service's runtime (scoring and logging each request), the Bento, and `nbs serve`. The request schema, scoring, the prediction log and the defences against hostile clients each have their own notebook (10a_schema, 10b_scoring, 10c_predlog, 10d_guard)."""

__version__ = "0.1.0"
