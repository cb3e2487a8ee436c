"""raymoe: a Ray-based training and serving platform for DeepSeek-V3-style MoE models.

Importing from a bare source tree. In the repository ``raymoe`` is ``platform/raymoe``, and its subpackages
``raymoe.actors``, ``raymoe.jobs`` and ``raymoe.conf`` are the top-level folders ``actors/``, ``jobs/`` and ``conf/``
(pyproject's ``package-dir``). An install (editable or wheel) maps them; a source tree that was only copied — a Ray
job's uploaded working directory run with ``PYTHONPATH=platform``, see ``docs/cluster.md`` — has no installer to do
it. So when this file sits in ``<root>/platform/raymoe/`` next to ``<root>/actors/__init__.py`` and
``<root>/jobs/__init__.py``, ``<root>`` is appended to ``__path__`` and the three subpackages resolve in the *same*
tree, never in another checkout. An installed wheel or a staged copy (:func:`raymoe.jobs.cluster.stage_package`)
holds them as real subfolders, and nothing is appended.
"""
import os as _os

__version__ = "0.1.0"

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_os.path.dirname(_here))
if _os.path.basename(_os.path.dirname(_here)) == "platform" and all(
        _os.path.isfile(_os.path.join(_root, d, "__init__.py")) for d in ("actors", "jobs")):
    __path__.append(_root)  # noqa: F821 - the package's own __path__
del _here, _root
