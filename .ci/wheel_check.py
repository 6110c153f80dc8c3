"""What a user of the wheel gets: run by .ci/wheel_check.sh inside a throwaway virtualenv, from a
folder outside the repository, with nothing but that virtualenv on the PATH.

Checks that no compiler, CMake or apt is reachable, that ``hadaconv`` and its op library come
from the installed wheel, then exports a small model holding a HadamardProjection in the custom
form (``com.hadaconv::HadamardAffine``) and compares ONNX Runtime's output with a float64
reference.  Prints one line per check; exits non-zero on the first failure.
"""

import shutil
import sys
import tempfile
from pathlib import Path

from importlib.metadata import distribution, version

import numpy as np
from packaging.requirements import Requirement
import torch

import hadaconv
from hadaconv.export import export_onnx
from hadaconv.export.bundle import open_bundle
from hadaconv.hadamard import hadamard_matrix

repo = Path(sys.argv[1]).resolve()
here = Path.cwd().resolve()
assert repo not in (here, *here.parents), f"run from outside the repository, not {here}"
tools = {t: shutil.which(t) for t in ("cc", "gcc", "g++", "c++", "clang", "cmake", "nvcc", "make", "apt-get")}
assert not any(tools.values()), f"build tools reachable: {tools}"
package = Path(hadaconv.__file__).resolve().parent
assert repo not in package.parents, f"hadaconv imported from the repository: {package}"
lib = hadaconv.get_library_path()
assert isinstance(lib, str) and Path(lib).parent == package, lib
print(f"hadaconv {hadaconv.__version__} from {package}; op library {lib}; no compiler on PATH")

# The versions present satisfy what the wheel declares (its base requirements and the ort extra).
for line in distribution("hadaconv").requires or []:
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate({"extra": "ort"}):
        have = version(req.name)
        assert req.specifier.contains(have, prereleases=True), f"{req} is not met: {req.name} {have}"
print("requirements met: " + ", ".join(f"{n} {version(n)}" for n in ("torch", "onnx", "onnxscript", "onnxruntime")))

torch.manual_seed(0)
layer = hadaconv.HadamardProjection(48, block=4)  # 48 = 12 x 4: a Paley core and a block gamma
with torch.no_grad():
    layer.gamma.add_(0.1 * torch.randn_like(layer.gamma))
    layer.beta.normal_()
model = torch.nn.Sequential(layer).eval()
x = torch.randn(3, 5, 48)
out = Path(tempfile.mkdtemp(prefix="wheel-check-")) / "bundle"
export_onnx(model, out, x)
bundle = open_bundle(out, providers="cpu")
assert bundle.meta["form"] == "custom" and (out / Path(lib).name).is_file()
y = bundle.session.run(None, {bundle.session.get_inputs()[0].name: x.numpy()})[0]

h = hadamard_matrix(48, normalized=True)
z = (x.double().numpy() @ h.T).reshape(3, 5, 12, 4)
g = layer.gamma.detach().double().numpy()
ref = np.einsum("ijk,abik->abij", g, z).reshape(3, 5, 48) + layer.beta.detach().double().numpy()
err = float(np.abs(y - ref).max())
assert err < 1e-5, f"ONNX Runtime differs from the float64 reference by {err:.3g}"
print(f"export + ONNX Runtime (HadamardAffine) match the float64 reference: max abs {err:.2e}")
shutil.rmtree(out.parent)
