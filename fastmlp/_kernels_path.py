"""Make ``fastmlp.kernels`` importable from a plain checkout.

The repository keeps the Triton kernels in a top-level ``kernels/`` folder (the design card's
layout); pyproject.toml installs that folder as ``fastmlp.kernels``, so an installed fastmlp
(regular or editable) needs nothing from here. A plain copy of the repository used through
``PYTHONPATH=.`` has no such mapping: for that case only, the checkout's root is added to the
package's search path so that ``fastmlp.kernels`` resolves to ``<root>/kernels``.
"""

import importlib.util
import os


def ensure_kernels_importable(package_path: list) -> None:
    """Append the checkout root to ``fastmlp.__path__`` if ``fastmlp.kernels`` is not found."""
    if importlib.util.find_spec("fastmlp.kernels") is not None:
        return
    root = os.path.dirname(os.path.abspath(package_path[0]))
    if os.path.isfile(os.path.join(root, "kernels", "__init__.py")):
        package_path.append(root)
