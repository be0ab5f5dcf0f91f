"""pymerge: compiled-kernel accelerated model merging.

    import pymerge
    report = pymerge.merge("config.yml", "out/")      # or a dict, or a MergeConfig
    merged = pymerge.ops.ties_merge(base, [a, b], densities=0.3)
"""

__version__ = "0.1.0"

__all__ = ["merge", "MergeReport", "ops", "emr", "__version__"]

# The public names load on first use: `import pymerge` (and so every
# `python -m pymerge.cli ...`) must not pay for torch and the engine up front.
_LAZY = {"merge": "pymerge.engine", "MergeReport": "pymerge.engine", "ops": "pymerge.ops", "emr": "pymerge.emr"}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pymerge' has no attribute {name!r}")
    import importlib

    mod = importlib.import_module(module)
    value = mod if module == f"pymerge.{name}" else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
