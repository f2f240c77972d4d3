"""The dispatch table (distilkernels.dispatch): every op on every backend, with a fake kernel and a reference;
capability questions; no import circle in the package; registration with torch (opcheck, torch.compile)."""
from __future__ import annotations

import ast
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import distilkernels
from distilkernels import dispatch, ops, reference
from distilkernels._ext import load_extension
from helpers import fused_qkv, make_mask

OPS = torch.ops.distilkernels


def test_every_op_has_every_backend_a_reference_and_an_entry_point():
    assert set(dispatch.OPS) == {op for op, _ in dispatch._TABLE}
    for op in dispatch.OPS:
        for backend in dispatch.BACKENDS:
            assert callable(dispatch._TABLE[(op, backend)]), (op, backend)
        assert dispatch.implementation(op, "torch") is getattr(reference, op)
        assert callable(getattr(ops, op)), f"distilkernels.ops.{op} is missing"


@pytest.mark.requires_ext
@pytest.mark.parametrize("op", dispatch.OPS)
def test_every_cpp_op_has_a_schema_and_a_fake_kernel(op):
    from torch._library.simple_registry import singleton

    assert hasattr(OPS, op), f"csrc/ops.cpp declares no {op}"
    assert singleton.find(f"distilkernels::{op}").fake_impl.kernel is not None, f"_fake.py registers no fake {op}"


@pytest.mark.parametrize("op", [op for op in dispatch.OPS if not dispatch.is_reference(op, "triton")])
def test_triton_entries_are_lazy_kernels(op):
    pytest.importorskip("triton")
    entry = dispatch._TABLE[(op, "triton")]
    assert isinstance(entry, dispatch._Lazy), "a Triton entry must not import triton before it is called"
    kernel = dispatch.implementation(op, "triton")
    assert entry.module.startswith("distilkernels.triton.") and kernel is getattr(sys.modules[entry.module], op)
    assert hasattr(torch.ops.distilkernels_triton, op), "each Triton kernel is a torch.library.triton_op"


def test_importing_the_package_imports_no_triton_module():
    """distilkernels.triton.* (kernels decorated at import) load only when a Triton kernel is first called."""
    script = ("import sys, torch, distilkernels\n"
              "from distilkernels import dispatch, ops\n"
              "dispatch.has_kernel('linear_packed', torch.randn(2, 2))\n"
              "print([m for m in sys.modules if m.startswith('distilkernels.triton')])\n")
    env = {k: v for k, v in os.environ.items() if k != "DISTILKERNELS_BACKEND"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_has_kernel_answers_for_the_tensor():
    x = torch.randn(3, 4)
    with ops.force_backend("torch"):
        assert not dispatch.has_kernel("linear_packed", x)  # the reference is no kernel of ours
        assert not dispatch.has_kernel("attention", x)
    with ops.force_backend("triton"):
        assert not dispatch.has_kernel("linear_packed", x)  # GEMMs stay with torch on that backend
    if load_extension() is not None:
        with ops.force_backend("cpp"):
            assert dispatch.has_kernel("linear_packed", x)
            assert not dispatch.has_kernel("linear_packed", x.bfloat16())  # the packed GEMM is fp32-only
            assert dispatch.has_kernel("attention", x.bfloat16())
            assert not dispatch.has_kernel("attention", x.to("meta"))  # not a CPU tensor
        assert dispatch.available("linear_packed", x) == (ops.backend_for(x.device) == "cpp")


def test_force_backend_and_its_errors():
    assert ops.force_backend is dispatch.force_backend and ops.backend_for is dispatch.backend_for
    with ops.force_backend("torch"):
        assert ops.backend_for(torch.device("cpu")) == "torch"
        with ops.force_backend(None):
            expected = "cpp" if load_extension() is not None else "torch"
            if os.environ.get("DISTILKERNELS_BACKEND") is None:
                assert ops.backend_for(torch.device("cpu")) == expected
    with pytest.raises(ValueError, match="backend must be one of"):
        with ops.force_backend("cuda"):
            pass
    with ops.force_backend("cpp"), pytest.raises(RuntimeError, match="forced but cannot run"):
        ops.add_layer_norm(torch.randn(2, 3, device="meta"), None, torch.ones(3, device="meta"),
                           torch.zeros(3, device="meta"))


def test_backend_from_environment():
    script = "import torch\nfrom distilkernels import ops\nprint(ops.backend_for(torch.device('cpu')))\n"
    env = dict(os.environ, DISTILKERNELS_BACKEND="torch")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.split()[-1] == "torch", result.stderr[-2000:]


def _package_imports() -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in the file, function-level imports included)."""
    root = pathlib.Path(distilkernels.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                edges.add(base)
                edges.update(f"{base}.{alias.name}" for alias in node.names)  # `from . import ops`
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def test_no_import_circle_in_the_package():
    graph = _package_imports()
    assert "distilkernels.dispatch" in graph and graph["distilkernels.triton"] == set()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module, path):
        state[module] = 1
        for dep in sorted(graph[module]):
            if dep == "distilkernels" or module == "distilkernels":
                continue  # the package __init__ re-exports its modules; importing a submodule runs it first
            if state.get(dep) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


# ----------------------------------------------------------------------------------------------------------
# Registration with torch: opcheck of every C++ op, torch.compile through the functional API


def _qkv_mask():
    q, k, v = fused_qkv(2, 9, 2, 8)
    return q, k, v, make_mask("holey", 2, 9)


# name -> (C++ op, a function making its arguments): the parametrization below is this dict's keys.
OPCHECK_CASES = {
    "add_layer_norm": ("add_layer_norm", lambda: (torch.randn(3, 5, 37), torch.randn(3, 5, 37), torch.randn(37),
                                                  torch.randn(37), 1e-5)),
    "add_layer_norm-bf16-no-residual": ("add_layer_norm", lambda: (torch.randn(3, 5, 37).bfloat16(), None,
                                                                   torch.randn(37), torch.randn(37), 1e-5)),
    "bias_act_": ("bias_act_", lambda: (torch.randn(4, 37), torch.randn(37), "gelu")),
    "attention-strided-mask": ("attention", lambda: (*_qkv_mask(), 0.3)),
    "attention-contiguous": ("attention", lambda: (*(t.contiguous() for t in _qkv_mask()[:3]), None, 0.3)),
    "varlen_attention": ("varlen_attention", lambda: (*(t[0] for t in _qkv_mask()[:3]),
                                                      torch.tensor([0, 4, 9], dtype=torch.int32), 5, 0.3)),
    "linear_bf16_add_layer_norm": ("linear_bf16_add_layer_norm", lambda: (
        torch.randn(5, 12).bfloat16(), OPS.pack_linear_bf16(torch.randn(37, 12), False), 37, torch.randn(37),
        torch.randn(5, 37).bfloat16(), torch.randn(37), torch.randn(37).bfloat16(), 1e-5)),
    "normalize_rows": ("normalize_rows", lambda: (torch.randn(4, 37),)),
    "scale_rows_": ("scale_rows_", lambda: (torch.randn(4, 37), torch.rand(4), torch.randn(37))),
    "scale_rows_-no-bias": ("scale_rows_", lambda: (torch.randn(4, 37), torch.rand(4), None)),
}


@pytest.mark.requires_ext
@pytest.mark.parametrize("case", list(OPCHECK_CASES))
def test_opcheck(case):
    op, make_args = OPCHECK_CASES[case]
    torch.library.opcheck(getattr(OPS, op), make_args())


@pytest.mark.requires_ext
def test_torch_compile_fullgraph():
    @torch.compile(fullgraph=True, backend="aot_eager")
    def block(x, residual, weight, bias, q, k, v, mask):
        h = ops.add_layer_norm(x, residual, weight, bias, 1e-12)
        return ops.attention(q, k, v, mask) + h.view(q.shape)

    q, k, v = fused_qkv(2, 7, 2, 8)
    x, residual = torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    weight, bias = torch.randn(16), torch.randn(16)
    mask = make_mask("holey", 2, 7)
    expected = OPS.attention(q, k, v, mask, 8 ** -0.5)[0] + \
        OPS.add_layer_norm(x, residual, weight, bias, 1e-12)[0].view(q.shape)
    with ops.force_backend("cpp"):
        assert torch.equal(block(x, residual, weight, bias, q, k, v, mask), expected)


@pytest.mark.requires_cuda
def test_triton_torch_compile_traces_through():
    """On a GPU torch.compile sees the Triton kernels (triton_op + wrap_triton) in one graph. Under the
    interpreter wrap_triton hands back the interpreted function, which fake tensors cannot run."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: set TRITON_INTERPRET=0 to run the compiled kernels on the GPU")
    device = torch.device("cuda")
    q, k, v = fused_qkv(2, 65, 4, 64, torch.float16, device)
    mask = make_mask("holey", 2, 65, device)
    x = torch.randn(2, 65, 256, device=device, dtype=torch.float16)
    weight, bias = torch.randn(256, device=device, dtype=torch.float16), torch.randn(256, device=device,
                                                                                       dtype=torch.float16)

    def block(x, q, k, v, mask):
        h = ops.attention(q, k, v, mask).flatten(2)
        return ops.add_layer_norm(h, x, weight, bias, 1e-12)

    with ops.force_backend("triton"):
        eager = block(x, q, k, v, mask)
        compiled = torch.compile(block, fullgraph=True)(x, q, k, v, mask)
    assert (compiled.double() - eager.double()).abs().max().item() <= 1e-2  # fp16 of order 1: a few ulps
