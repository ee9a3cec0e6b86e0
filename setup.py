"""Packaging for meshstream; the metadata lives in setup.cfg.

The twistd plugin is shipped as a module of the ``twisted.plugins`` namespace
package (there is deliberately no ``__init__.py`` in ``twisted/plugins``), so
both an editable and a plain ``pip install .`` make ``twistd
meshstream-tracker`` and ``twistd meshstream-agent`` available.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["meshstream", "meshstream.*"]), "twisted.plugins"],
)
