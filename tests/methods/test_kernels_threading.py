"""Both kernels (merge and selection) from several Python threads at once, with numba's default
``workqueue`` threading layer: the kernels use numba's own threads nowhere, so nothing aborts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = r"""
import hashlib, os, sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numba
import torch

from amalgam.engine import MergeOptions, run_merge
from amalgam.methods.kernels import launch, select
from amalgam.recipe import parse_recipe
from tests.helpers import family, recipe_dict

root = Path(sys.argv[1])
launch.MIN_RANGE = 256  # cut every tensor into ranges on the kernel pool
torch.set_num_threads(2)

# the selection from two Python threads at once, each cut into ranges on the shared pool
g = torch.Generator().manual_seed(0)
xs = [torch.randn(3001, generator=g).to(dtype) for dtype in (torch.bfloat16, torch.float16)] * 4
base = torch.randn(3001, generator=g)
def both(x):
    mag = torch.sub(x, base.float()).abs()
    want = mag.kthvalue(mag.numel() - 700 + 1).values.item()
    return select.kth_largest_magnitude(x, 700, base) == want
with ThreadPoolExecutor(2) as pool:
    assert all(pool.map(both, xs * 5))

# merges through the engine: the whole-model threshold's histograms run on two stats threads,
# then the fused TIES kernel; bytes equal to the torch path's (AMALGAM_FUSED_KERNELS=0)
base_dir, experts = family(root / "in")
def digest(method, out, **extra):
    run_merge(parse_recipe(recipe_dict(base_dir, experts, method, root / out, **extra)),
              MergeOptions(device="cpu", threads=2))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / out).iterdir()) if p.suffix == ".safetensors"}
runs = (("ties", {"params": {"trim": "model"}}), ("ties", {}), ("dare_ties", {}))
for i, (method, extra) in enumerate(runs):
    fused = digest(method, f"fused{i}", **extra)
    os.environ["AMALGAM_FUSED_KERNELS"] = "0"
    assert fused == digest(method, f"torch{i}", **extra), method
    del os.environ["AMALGAM_FUSED_KERNELS"]

try:  # no numba parallel region ever ran, so no threading layer was loaded
    layer = numba.threading_layer()
except ValueError:
    layer = None
assert layer is None, layer
print("ok")
"""


def test_kernels_from_two_threads_under_workqueue(tmp_path: Path) -> None:
    env = os.environ | {"NUMBA_THREADING_LAYER": "workqueue"}
    root = Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
