"""copier's Jinja extension (copier.yml `_jinja_extensions`): the Scaffold class of the template's own nbs_lib."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this template's nbs_lib, not an installed one
for _m in [m for m in sys.modules if m == 'nbs_lib' or m.startswith('nbs_lib.')]: del sys.modules[_m]
from nbs_lib.scaffold import Scaffold  # noqa: E402

__all__ = ['Scaffold']
