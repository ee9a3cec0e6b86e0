"""Packaging for meshstream; the metadata lives in setup.cfg.

The twistd plugin is shipped as a module of the ``twisted.plugins`` namespace
package (there is deliberately no ``__init__.py`` in ``twisted/plugins``), so
a plain ``pip install .`` makes ``twistd meshstream-tracker`` and ``twistd
meshstream-agent`` available.  An editable install needs
``--config-settings editable_mode=compat``: twistd finds plugins in
``twisted/plugins`` folders on sys.path, which the default editable mode
does not put there.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["meshstream", "meshstream.*"]), "twisted.plugins"],
)
