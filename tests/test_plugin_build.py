"""Build checks for the TensorRT ``feather::SelectTokens`` plugin in ``engines/plugin``.

(a) the CUDA kernels compile with nvcc (sm_87 for Jetson Orin, sm_90) and the kernel test
    executable builds; its host-only checks run anywhere (GPU cases need a GPU);
(b) the IPluginV3 plugin compiles against the TensorRT headers named by $TENSORRT_INCLUDE_DIR,
    links into libfeather_plugin.so (no libnvinfer needed) and passes the CPU-only host test
    through its exported getCreators()/setLoggerFinder() entry points;
(c) on a GPU machine, select_tokens_kernel_test runs every selection/gather case against its CPU
    reference;
(d) (slow) the CMake project configures and builds.
Each test skips, with the reason, when its tool (nvcc, TensorRT headers, GPU, cmake) is absent.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "engines" / "plugin"
KERNEL_CU = PLUGIN_DIR / "select_tokens_kernel.cu"
KERNEL_TEST = PLUGIN_DIR / "select_tokens_kernel_test.cpp"
PLUGIN_CPP = PLUGIN_DIR / "select_tokens_plugin.cpp"
BTP_PLUGIN_CPP = PLUGIN_DIR / "btp_select_plugin.cpp"
PLUGIN_HOST_TEST = PLUGIN_DIR / "select_tokens_plugin_host_test.cpp"
EXPORT_MAP = PLUGIN_DIR / "feather_plugin.map"
BTP_KERNEL_CU = PLUGIN_DIR / "btp_select_kernel.cu"
BTP_KERNEL_TEST = PLUGIN_DIR / "btp_select_kernel_test.cpp"
TIMEOUT = 600


def _skip(reason: str):
    print(f"SKIP: {reason}")
    pytest.skip(reason)


def _nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates += [shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _cuda_root(nvcc: str) -> Path | None:
    """The toolkit directory holding include/cuda_runtime_api.h (nvcc may be a wrapper script)."""
    roots = [Path(os.environ["CUDA_HOME"])] if os.environ.get("CUDA_HOME") else []
    roots += [Path(os.path.realpath(nvcc)).parent.parent, Path("/usr/local/cuda")]
    for root in roots:
        if (root / "include" / "cuda_runtime_api.h").is_file():
            return root
    return None


def _cudart_dir(root: Path) -> Path:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/aarch64-linux/lib"):
        if (root / sub / "libcudart.so").exists():
            return root / sub
    return root / "lib64"


def _run(cmd, env=None, cwd=None) -> subprocess.CompletedProcess:
    print("$", " ".join(str(c) for c in cmd))
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=TIMEOUT, env=env,
                          cwd=cwd)
    if proc.stdout:
        print(proc.stdout[-6000:])
    if proc.stderr:
        print(proc.stderr[-6000:])
    return proc


def _check(cmd, env=None, cwd=None) -> subprocess.CompletedProcess:
    proc = _run(cmd, env=env, cwd=cwd)
    assert proc.returncode == 0, f"command failed ({proc.returncode}): {' '.join(map(str, cmd))}\n{proc.stderr[-4000:]}"
    return proc


def _require_nvcc() -> tuple[str, Path]:
    nvcc = _nvcc()
    if nvcc is None:
        _skip("nvcc not found (set CUDACXX or CUDA_HOME, or put nvcc on PATH)")
    root = _cuda_root(nvcc)
    if root is None:
        _skip(f"CUDA headers (cuda_runtime_api.h) not found next to {nvcc}")
    return nvcc, root


def _runtime_env(root: Path) -> dict:
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(_cudart_dir(root)), env.get("LD_LIBRARY_PATH")) if p)
    return env


def _compile_kernel_object(nvcc: str, out: Path, archs=("87", "90")) -> Path:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    _check([nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden,-Wall,-Wextra", *gencode,
            "-c", KERNEL_CU, "-o", out])
    assert out.stat().st_size > 0
    return out


def _gpu_available() -> tuple[bool, str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False, "nvidia-smi not found: no NVIDIA GPU/driver on this machine"
    try:
        proc = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"nvidia-smi failed: {e}"
    if proc.returncode != 0 or "GPU" not in proc.stdout:
        return False, f"nvidia-smi -L lists no GPU (rc={proc.returncode}): {proc.stderr.strip()[:200]}"
    return True, proc.stdout.strip()


# ---------------------------------------------------------------- (a) kernels


def test_kernel_compiles_with_nvcc(tmp_path):
    """The kernels compile for Jetson Orin (sm_87) and Hopper (sm_90); the kernel test links."""
    nvcc, root = _require_nvcc()
    obj = _compile_kernel_object(nvcc, tmp_path / "select_tokens_kernel.o")

    exe = tmp_path / "select_tokens_kernel_test"
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        _skip("no host C++ compiler (g++/c++) to build select_tokens_kernel_test")
    _check([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-isystem", root / "include",
            "-c", KERNEL_TEST, "-o", tmp_path / "test.o"])
    _check([cxx, tmp_path / "test.o", obj, f"-L{_cudart_dir(root)}", "-lcudart", "-o", exe])
    # Host-only checks (closed-form |G|, argument validation) run without a GPU; the GPU cases
    # run only where a device exists (exit 77 = no device, after the host checks passed).
    proc = _run([exe, "--random", "4"], env=_runtime_env(root))
    assert proc.returncode in (0, 77), f"kernel test exited {proc.returncode}"
    assert "PASS host_checks" in proc.stdout


# A fake CUDA runtime for the kernels' host code: nvcc's launch stubs (CUDA 12: cudaLaunchKernel;
# CUDA 13: __cudaGetKernel/__cudaLaunchKernel) and the error slot, modelled on the runtime API
# documentation: a failing call sets the thread's last error, a successful launch leaves it as it
# was, cudaGetLastError returns and clears it, cudaPeekAtLastError only returns it.
_FAKE_CUDART_C = r"""
static int last_error, fail_launches, launches;
static void* handle[4];
void fake_set_last_error(int e) { last_error = e; }
void fake_fail_launches(int e) { fail_launches = e; }
int fake_launches(void) { return launches; }
int cudaGetLastError(void) { int e = last_error; last_error = 0; return e; }
int cudaPeekAtLastError(void) { return last_error; }
static int launch(void) { ++launches; if (fail_launches) last_error = fail_launches; return fail_launches; }
int cudaLaunchKernel() { return launch(); }
int __cudaLaunchKernel() { return launch(); }
int __cudaGetKernel() { return 0; }
unsigned __cudaPushCallConfiguration() { return 0; }
int __cudaPopCallConfiguration() { return 0; }
void** __cudaRegisterFatBinary() { return handle; }
void __cudaRegisterFatBinaryEnd() {}
void __cudaUnregisterFatBinary() {}
void __cudaRegisterFunction() {}
"""
_FAKE_CUDART_SYMBOLS = {"cudaGetLastError", "cudaPeekAtLastError", "cudaLaunchKernel", "__cudaLaunchKernel",
                        "__cudaGetKernel", "__cudaPushCallConfiguration", "__cudaPopCallConfiguration",
                        "__cudaRegisterFatBinary", "__cudaRegisterFatBinaryEnd", "__cudaUnregisterFatBinary",
                        "__cudaRegisterFunction"}
_LAUNCH_DRIVER_CPP = r"""
#include "select_tokens_kernel.h"
#include <cstdio>
extern "C" void fake_set_last_error(int);
extern "C" void fake_fail_launches(int);
extern "C" int fake_launches(void);
int main()
{
    float* scores = reinterpret_cast<float*>(0x10000);  // never dereferenced: no kernel runs
    int64_t* kept = reinterpret_cast<int64_t*>(0x20000);
    void* ws = reinterpret_cast<void*>(0x30000);
    auto select = [&] { return feather_select_tokens(scores, 64, 8, 8, 4, 0, kept, ws, feather_select_workspace_bytes(64), nullptr); };
    auto gather = [&] { return feather_gather_rows(ws, ws, 70, 16, 4, 64, 8, kept, kept, nullptr); };
    fake_set_last_error(1);        // cudaErrorInvalidValue left by someone else's call
    int const s1 = select();
    fake_set_last_error(1);
    int const g1 = gather();
    int const left = cudaPeekAtLastError();
    std::printf("stale: select %d gather %d launches %d left %d\n", s1, g1, fake_launches(), left);
    fake_fail_launches(9);         // cudaErrorInvalidConfiguration from our own launch
    int const s2 = select();
    int const g2 = gather();
    std::printf("failing: select %d gather %d\n", s2, g2);
    return (s1 == FEATHER_SELECT_OK && g1 == FEATHER_SELECT_OK && fake_launches() == 5 && left == 0
               && s2 == FEATHER_SELECT_ERR_CUDA && g2 == FEATHER_SELECT_ERR_CUDA) ? 0 : 1;
}
"""


def test_stale_cuda_error_does_not_fail_a_launch(tmp_path):
    """CPU, no GPU: the kernels' host code linked against a fake CUDA runtime. An error another
    library left in the thread's last-error slot does not fail our launches (it is cleared before
    them); an error of our own launch still returns FEATHER_SELECT_ERR_CUDA."""
    nvcc, root = _require_nvcc()
    cxx, cc = shutil.which("g++") or shutil.which("c++"), shutil.which("gcc") or shutil.which("cc")
    if cxx is None or cc is None:
        _skip("no host C/C++ compiler (gcc/g++)")
    obj = _compile_kernel_object(nvcc, tmp_path / "select_tokens_kernel.o", archs=("90",))
    nm = shutil.which("nm")
    if nm is None:
        _skip("nm not found (to list the CUDA symbols the kernel object needs)")
    undefined = {line.split()[-1] for line in _check([nm, "-u", obj]).stdout.splitlines() if line.strip()}
    unknown = {u for u in undefined if "cuda" in u.lower()} - _FAKE_CUDART_SYMBOLS
    if unknown:
        _skip(f"this nvcc's launch stubs need CUDA symbols the fake runtime lacks: {sorted(unknown)}")
    (tmp_path / "fake_cudart.c").write_text(_FAKE_CUDART_C)
    (tmp_path / "driver.cpp").write_text(_LAUNCH_DRIVER_CPP)
    _check([cc, "-std=gnu11", "-w", "-c", tmp_path / "fake_cudart.c", "-o", tmp_path / "fake_cudart.o"])
    _check([cxx, "-std=c++17", "-I", PLUGIN_DIR, "-isystem", root / "include", "-c", tmp_path / "driver.cpp",
            "-o", tmp_path / "driver.o"])
    exe = tmp_path / "launch_errors"
    _check([cxx, tmp_path / "driver.o", obj, tmp_path / "fake_cudart.o", "-o", exe])
    proc = _run([exe])
    assert proc.returncode == 0, proc.stdout


def test_select_cpu_reference_matches_the_python_oracle(tmp_path):
    """The C++ reference the SelectTokens kernel is tested against keeps what
    methods.selection.select_tokens keeps with grid_mask's forced grid (the oracle the ONNX
    function body is tested against), raster offsets (a CLS before the raster) included."""
    import numpy as np

    from feather_export.methods.selection import grid_mask, select_tokens

    nvcc, root = _require_nvcc()
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        _skip("no host C++ compiler (g++/c++) to build select_tokens_kernel_test")
    obj = _compile_kernel_object(nvcc, tmp_path / "select_tokens_kernel.o", archs=("90",))
    exe = tmp_path / "select_tokens_kernel_test"
    _check([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-isystem", root / "include",
            "-c", KERNEL_TEST, "-o", tmp_path / "test.o"])
    _check([cxx, tmp_path / "test.o", obj, f"-L{_cudart_dir(root)}", "-lcudart", "-o", exe])
    rng = np.random.default_rng(5)
    cases, expected = [], []
    for n, side, budget, stride, offset, tied in [(577, 24, 144, 3, 1, False), (577, 24, 100, 4, 1, True),
                                                  (257, 16, 64, 4, 1, True), (576, 24, 144, 3, 0, False),
                                                  (577, 24, 64, 3, 1, False), (66, 8, 20, 3, 2, True),
                                                  (17, 4, 4, 2, 1, False), (257, 16, 30, 0, 1, False)]:
        scores = (np.round(rng.random(n) * 3) / 3 if tied else rng.standard_normal(n)).astype(np.float32)
        scores[0] = -np.inf if offset and n % 2 else scores[0]
        expected.append(select_tokens(scores, budget, grid_mask(n, side, stride, offset)).tolist())
        cases.append(" ".join(map(str, [n, budget, side, stride, offset, *(repr(float(v)) for v in scores)])))
    (tmp_path / "cases.txt").write_text("\n".join(cases) + "\n")
    proc = _check([exe, "--reference", tmp_path / "cases.txt"], env=_runtime_env(root))
    got = [[int(v) for v in line.split()] for line in proc.stdout.strip().splitlines()]
    assert got == expected


def _build_btp_test(tmp_path, nvcc: str, root: Path, archs=("87", "90")) -> Path:
    """btp_select_kernel_test linked against the BTP kernels compiled for ``archs``."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        _skip("no host C++ compiler (g++/c++) to build btp_select_kernel_test")
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    objs = []
    for src in (BTP_KERNEL_CU, KERNEL_CU):
        obj = tmp_path / f"{src.stem}.o"
        _check([nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden,-Wall,-Wextra",
                *gencode, "-c", src, "-o", obj])
        objs.append(obj)
    exe = tmp_path / "btp_select_kernel_test"
    _check([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off",
            "-isystem", root / "include", "-c", BTP_KERNEL_TEST, "-o", tmp_path / "btp_test.o"])
    _check([cxx, tmp_path / "btp_test.o", *objs, f"-L{_cudart_dir(root)}", "-lcudart", "-o", exe])
    return exe


def test_btp_kernel_compiles_with_nvcc(tmp_path):
    """The BTP (SelectBalanced) kernels compile for sm_87 and sm_90; the kernel test links and its
    host-only checks pass (the GPU cases need a GPU: exit 77 here)."""
    nvcc, root = _require_nvcc()
    exe = _build_btp_test(tmp_path, nvcc, root)
    proc = _run([exe, "--random", "4"], env=_runtime_env(root))
    assert proc.returncode in (0, 77), f"btp kernel test exited {proc.returncode}"
    assert "PASS host_checks" in proc.stdout


def test_btp_cpu_reference_matches_the_python_oracle(tmp_path):
    """The C++ reference the BTP kernel is tested against keeps what methods.selection.btp_select
    keeps (the oracle the ONNX graphs are tested against), on random cases."""
    import numpy as np

    from feather_export.methods.selection import btp_select, farthest_point_seed

    nvcc, root = _require_nvcc()
    exe = _build_btp_test(tmp_path, nvcc, root, archs=("90",))
    rng = np.random.default_rng(11)
    cases, expected = [], []
    for n, dim, keep, m, pool, seeded in [(64, 8, 32, 9, 33, True), (100, 20, 40, 0, 0, False),
                                          (81, 5, 30, 30, 36, False), (144, 16, 48, 20, 30, True),
                                          (25, 3, 25, 4, 7, True), (200, 12, 77, 23, 85, False)]:
        logits = rng.standard_normal(n).astype(np.float32)
        features = rng.standard_normal((n, dim)).astype(np.float32)
        seed = farthest_point_seed(int(round(n ** 0.5)), keep // 2) if seeded else np.zeros(0, np.int64)
        seed = seed[seed < n]
        expected.append(btp_select(logits, features, keep, m, pool, seed).tolist())
        fields = [n, dim, keep, m, pool, len(seed), *seed.tolist(),
                  *(repr(float(v)) for v in logits), *(repr(float(v)) for v in features.ravel())]
        cases.append(" ".join(map(str, fields)))
    (tmp_path / "cases.txt").write_text("\n".join(cases) + "\n")
    proc = _check([exe, "--reference", tmp_path / "cases.txt"], env=_runtime_env(root))
    got = [[int(v) for v in line.split()] for line in proc.stdout.strip().splitlines()]
    assert got == expected


# ---------------------------------------------------------------- (b) plugin vs TensorRT headers


@pytest.mark.tensorrt
def test_plugin_compiles_against_tensorrt_headers(tmp_path):
    """select_tokens_plugin.cpp compiles against $TENSORRT_INCLUDE_DIR and exports the entry points."""
    inc = os.environ.get("TENSORRT_INCLUDE_DIR")
    if not inc:
        _skip("TENSORRT_INCLUDE_DIR is not set (point it at the directory holding NvInfer.h)")
    inc = Path(inc)
    if not (inc / "NvInfer.h").is_file() or not (inc / "NvInferRuntime.h").is_file():
        _skip(f"TensorRT headers not found in TENSORRT_INCLUDE_DIR={inc}")
    nvcc, root = _require_nvcc()  # NvInferRuntimeBase.h includes cuda_runtime_api.h
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        _skip("no host C++ compiler (g++/c++)")

    flags = ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wextra", "-Werror",
             "-isystem", inc, "-isystem", root / "include"]
    plugin_obj = tmp_path / "select_tokens_plugin.o"
    _check([cxx, *flags, "-c", PLUGIN_CPP, "-o", plugin_obj])
    btp_plugin_obj = tmp_path / "btp_select_plugin.o"
    _check([cxx, *flags, "-c", BTP_PLUGIN_CPP, "-o", btp_plugin_obj])
    # nvcc as the compiler driver too (host-only C++ file; the CMake build uses the C++ compiler).
    _check([nvcc, "-std=c++17", "-Xcompiler", "-fPIC", "-isystem", inc, "-c", PLUGIN_CPP,
            "-o", tmp_path / "select_tokens_plugin_nvcc.o"])

    kernel_obj = _compile_kernel_object(nvcc, tmp_path / "select_tokens_kernel.o", archs=("87",))
    btp_kernel_obj = tmp_path / "btp_select_kernel.o"
    _check([nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC,-fvisibility=hidden",
            "-gencode=arch=compute_87,code=sm_87", "-c", BTP_KERNEL_CU, "-o", btp_kernel_obj])
    lib = tmp_path / "libfeather_plugin.so"
    _check([cxx, "-shared", "-o", lib, plugin_obj, btp_plugin_obj, kernel_obj, btp_kernel_obj,
            f"-L{_cudart_dir(root)}", "-lcudart",
            "-Wl,--no-undefined", f"-Wl,--version-script={EXPORT_MAP}"])
    nm = shutil.which("nm")
    if nm:
        exported = _check([nm, "-D", "--defined-only", lib]).stdout
        for sym in ("getCreators", "setLoggerFinder", "feather_select_tokens", "feather_gather_rows",
                    "feather_btp_select"):
            assert f" T {sym}\n" in exported, f"{sym} is not exported from libfeather_plugin.so"

    host_test = tmp_path / "select_tokens_plugin_host_test"
    _check([cxx, "-std=c++17", "-Wall", "-Wextra", "-isystem", inc, "-isystem", root / "include",
            PLUGIN_HOST_TEST, "-o", host_test, "-ldl"])
    proc = _run([host_test, lib], env=_runtime_env(root))
    assert proc.returncode == 0, "plugin host test failed"
    assert "OK: 0 failure(s)" in proc.stdout


# ---------------------------------------------------------------- (c) kernel test on a GPU


@pytest.mark.gpu
def test_kernel_matches_cpu_reference_on_gpu(tmp_path):
    """Build select_tokens_kernel_test for the local GPU and run all cases bit-exactly."""
    ok, why = _gpu_available()
    if not ok:
        _skip(why)
    print(why)
    nvcc, root = _require_nvcc()
    exe = tmp_path / "select_tokens_kernel_test"
    _check([nvcc, "-std=c++17", "-O2", "-arch=native", KERNEL_CU, KERNEL_TEST, "-o", exe])
    proc = _run([exe, "--random", "200", "--quiet"], env=_runtime_env(root))
    assert proc.returncode == 0, f"select_tokens_kernel_test exited {proc.returncode}"
    assert "OK:" in proc.stdout


@pytest.mark.gpu
def test_btp_kernel_matches_cpu_reference_on_gpu(tmp_path):
    """Build btp_select_kernel_test for the local GPU and run every case against the CPU reference."""
    ok, why = _gpu_available()
    if not ok:
        _skip(why)
    nvcc, root = _require_nvcc()
    exe = tmp_path / "btp_select_kernel_test"
    _check([nvcc, "-std=c++17", "-O2", "-arch=native", "-Xcompiler", "-ffp-contract=off",
            BTP_KERNEL_CU, KERNEL_CU, BTP_KERNEL_TEST, "-o", exe])
    proc = _run([exe, "--random", "100", "--quiet"], env=_runtime_env(root))
    assert proc.returncode == 0, f"btp_select_kernel_test exited {proc.returncode}"
    assert "OK:" in proc.stdout


# ---------------------------------------------------------------- (d) CMake


@pytest.mark.slow
def test_cmake_configure_and_build(tmp_path):
    """The CMake project configures and builds (plugin too when $TENSORRT_INCLUDE_DIR is set)."""
    cmake = shutil.which("cmake")
    if cmake is None:
        _skip("cmake not found")
    nvcc, root = _require_nvcc()
    build = tmp_path / "build"
    args = [cmake, "-S", PLUGIN_DIR, "-B", build, f"-DCMAKE_CUDA_COMPILER={os.path.realpath(nvcc)}",
            "-DCMAKE_CUDA_ARCHITECTURES=87"]
    inc = os.environ.get("TENSORRT_INCLUDE_DIR")
    with_plugin = bool(inc) and (Path(inc) / "NvInfer.h").is_file()
    if with_plugin:
        args.append(f"-DTensorRT_INCLUDE_DIR={inc}")
    else:
        args.append("-DFEATHER_PLUGIN_BUILD_PLUGIN=OFF")
    _check(args)
    _check([cmake, "--build", build, "-j", str(min(8, os.cpu_count() or 1))])
    assert (build / "select_tokens_kernel_test").is_file()
    assert (build / "btp_select_kernel_test").is_file()
    if with_plugin:
        assert (build / "libfeather_plugin.so").is_file()
