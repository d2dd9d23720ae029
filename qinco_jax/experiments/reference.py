"""The PyTorch references' own modules, imported from a checkout for comparisons.

The benchmarks and the device check time the references (`qinco_v1/` of
facebookresearch/Qinco, or the root of its QINCo2 code) on the same weights. The library
never needs them; `import_reference` loads the named modules from the checkout's files
without adding the checkout to `sys.path`, so nothing else can be shadowed by it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType


def import_reference(directory: str | os.PathLike, *names: str) -> ModuleType:
    """Import the modules `names` of a reference checkout at `directory`, in that order,
    and return the last one.

    A name is a module file (`model_qinco` for `directory/model_qinco.py`) or a package
    (`qinco` for `directory/qinco/__init__.py`, whose submodules then import as usual).
    Each is registered in `sys.modules` under its own name, so that the reference's
    imports of its siblings (`from utils import ...` in qinco_v1's `model_qinco`) find
    the module loaded here: list those siblings first, e.g.
    `import_reference(d, "utils", "model_qinco")`. A module already imported from the
    same file is reused.

    Raises:
        FileNotFoundError: `directory` holds no such module or package.
    """
    root = Path(directory).resolve()
    module = None
    for name in names:
        package = root / name / "__init__.py"
        path = package if package.is_file() else root / f"{name}.py"
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: no module {name!r} there (looked for {root / name}.py and "
                                    f"{package}); give the folder of the reference that holds it")
        loaded = sys.modules.get(name)
        if loaded is not None and getattr(loaded, "__file__", None) and Path(loaded.__file__).resolve() == path:
            module = loaded
            continue
        spec = importlib.util.spec_from_file_location(
            name, path, submodule_search_locations=[str(path.parent)] if path == package else None)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    return module
