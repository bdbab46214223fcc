"""dtype-bench: shared components for measuring how training precision changes speed, memory and quality."""
import importlib.util
import sys

_missing = [name for name in ("torch", "transformers", "numpy") if importlib.util.find_spec(name) is None]
if _missing:
    raise SystemExit(f"dtype-bench: {', '.join(_missing)} not installed in {sys.executable}: run `make venv` and use "
                     ".venv/bin/python (or `pip install -r requirements.txt`)")

# Known, harmless messages optional libraries log when they are merely imported (transformers' quantizer registry
# imports torchao whenever it is installed, even for an fp32 run): each filter drops one message on one logger and
# nothing else, so every other warning, ours included, still shows.
import logging  # noqa: E402

_HARMLESS = {
    # torchao's prebuilt extensions for other CUDA / Python builds (mxfp8, CUTLASS kernels no config here uses)
    "torchao": ("Failed to load ", "/torchao/_C"),
    # torchao registering its enums as pytree constants, which torch now handles natively
    "torch.utils._pytree": ("<enum ", "is an Enum subclass and is now natively supported by torch.compile"),
    # bitsandbytes' optional 4-bit CPU kernel from the `kernels` package (4-bit is not used here)
    "bitsandbytes.backends.cpu.ops": ("Failed to load CPU gemm_4bit_forward from kernels-community", ""),
}


def _drop_harmless(start: str, contains: str):
    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(start) and contains in message)
    return keep


for _name, (_start, _contains) in _HARMLESS.items():
    logging.getLogger(_name).addFilter(_drop_harmless(_start, _contains))
