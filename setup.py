"""Builds pssr and its `pssr._C` extension.

The C++ CPU kernels are always built. The CUDA kernels are added when torch is a CUDA build and
a CUDA toolkit is found, or when FORCE_CUDA=1 (compile-only builds on machines without a GPU;
then set TORCH_CUDA_ARCH_LIST, default "9.0"). PSSR_SKIP_EXTENSION=1 installs the pure-PyTorch
package only. DEBUG=1 builds with -O0 -g.
"""

import glob
import os
import sys

from setuptools import find_packages, setup

here = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def extensions():
    if _env_flag("PSSR_SKIP_EXTENSION"):
        print("pssr: PSSR_SKIP_EXTENSION set, building no extension", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = _env_flag("DEBUG")
    force_cuda = _env_flag("FORCE_CUDA")
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and (
        torch.cuda.is_available() or force_cuda
    )
    if force_cuda and not with_cuda:
        raise RuntimeError(
            f"FORCE_CUDA=1 needs a CUDA build of torch (torch.version.cuda={torch.version.cuda}) "
            f"and a CUDA toolkit (CUDA_HOME={CUDA_HOME})"
        )
    if with_cuda and not torch.cuda.is_available():
        # torch's arch detection indexes an empty list when no GPU is visible.
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")

    opt = ["-O0", "-g"] if debug else ["-O3"]
    cxx = list(opt)  # cpp_extension adds the C++ standard the installed torch needs
    if "OpenMP" in torch.__config__.parallel_info():
        # at::parallel_for is inlined from headers and runs serially without OpenMP.
        cxx += ["-fopenmp"]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    kwargs = dict(
        name="pssr._C",
        sources=sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"] if "-fopenmp" in cxx else [],
        include_dirs=[os.path.join(here, "csrc")],
        py_limited_api=False,
    )
    if with_cuda:
        kwargs["sources"] += sorted(glob.glob("csrc/cuda/*.cu"))
        kwargs["extra_compile_args"]["nvcc"] = opt + ["-lineinfo"]
        ext = CUDAExtension(**kwargs)
    else:
        ext = CppExtension(**kwargs)
    print(
        f"pssr: building pssr._C for torch {torch.__version__}, CUDA kernels: {with_cuda}"
        + (f" (arch {os.environ.get('TORCH_CUDA_ARCH_LIST', 'auto')})" if with_cuda else ""),
        file=sys.stderr,
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = extensions()

setup(
    name="pssr",
    version="0.1.0",
    description="Pixel Surgery and Semantic Regeneration: an adversarial purifier with fused kernels",
    packages=find_packages(include=["pssr", "pssr.*"]) + ["pssr_cli"],
    package_dir={"pssr_cli": "cli"},
    package_data={"pssr": ["configs/*.yaml", "weights/*.safetensors"]},
    python_requires=">=3.10",
    # torchattacks 3.5.1 is installed separately with --no-deps (README): its metadata pins
    # requests~=2.25.1 and torchvision, neither of which it needs for the attacks we use.
    install_requires=[
        "torch>=2.6", "click>=8.1", "numpy", "safetensors", "pyyaml", "tqdm", "pillow>=10.1",
        "scipy", "matplotlib", "adversarial-robustness-toolbox>=1.20,<1.21",
    ],
    extras_require={"test": ["pytest>=8", "expecttest", "hypothesis"]},
    entry_points={"console_scripts": ["pssr=pssr_cli.main:cli"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
