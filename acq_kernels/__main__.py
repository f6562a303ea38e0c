"""`python -m acq_kernels`: versions, built backends, and the backend each device would use."""
import argparse
import platform
from typing import Optional, Sequence

import torch

from . import __version__, _backend, _extension


def main(argv: Optional[Sequence[str]] = None) -> None:
    # Takes no options; argparse gives --help and exits 2 on anything else (not silently ignored).
    argparse.ArgumentParser(prog="python -m acq_kernels", description=__doc__).parse_args(argv)
    print(f"acq_kernels {__version__}")
    print(f"python {platform.python_version()}  torch {torch.__version__}  "
          f"torch CUDA {torch.version.cuda or 'none'}")
    try:
        import triton
        print(f"triton {triton.__version__}"
              + ("  (TRITON_INTERPRET=1: kernels run on CPU tensors)" if _backend.triton_interpret() else ""))
    except Exception:
        print("triton: not installed")
    info = _extension.build_info()
    if info.get("built"):
        extra = (f"CUDA {info.get('cuda_version')} for archs {info.get('cuda_archs')}"
                 if info.get("with_cuda") else "CPU kernels only (built without CUDA)")
        print(f"extension acq_kernels._C: built, {extra}")
    else:
        print("extension acq_kernels._C: not available (Triton/reference only)")
    print(f"backend choice: {_backend.get_backend()} (set with {_backend.ENV_VAR} or set_backend)")
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    for dev in devices:
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
        try:
            chosen = _backend.select(dev)
        except RuntimeError as exc:
            chosen = f"error: {exc}"
        print(f"  {str(dev):8s} {name}: uses {chosen}; usable {_backend.usable_backends(dev)}")


if __name__ == "__main__":
    main()
