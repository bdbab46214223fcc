"""dtype-bench: shared components for measuring how training precision changes speed, memory and quality."""
import importlib.util
import sys

_missing = [name for name in ("torch", "transformers", "numpy") if importlib.util.find_spec(name) is None]
if _missing:
    raise SystemExit(f"dtype-bench: {', '.join(_missing)} not installed in {sys.executable}: run `make venv` and use "
                     ".venv/bin/python (or `pip install -r requirements.txt`)")
