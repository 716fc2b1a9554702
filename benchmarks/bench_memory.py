"""Peak memory of training with stem..layer3 frozen against full fine-tuning (same model, batch, input).

Each case runs in a fresh subprocess; the kernel's peak-RSS counter (VmHWM) is reset after building the
model and batch, so the figure is the peak during training above that point (weights and imports cancel out). Run: python benchmarks/bench_memory.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CASE = r"""
import json, sys, timm, torch
from finetune.models.stages import FreezePlan, StageMap, apply_freeze, set_train_mode
frozen = sys.argv[1] == "frozen"
torch.manual_seed(0)
model = timm.create_model("resnet50", num_classes=10)
images, targets = torch.randn(32, 3, 224, 224), torch.randint(0, 10, (32,))
plan = FreezePlan(trainable=("layer4", "head") if frozen else ("stem", "layer1", "layer2", "layer3", "layer4", "head"))
stages = StageMap.of(model, "fc")
apply_freeze(model, plan, stages)
set_train_mode(model, plan, stages)
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident size
base = status("VmRSS")
for _ in range(2):
    loss = torch.nn.functional.cross_entropy(model(images), targets)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
peak = status("VmHWM")
print(json.dumps({"extra_mib": (peak - base) / 1024}))
"""


def measure(case: str) -> float:
    out = subprocess.run([sys.executable, "-c", CASE, case], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_mib"]


def run(*, repeats: int = 3) -> list[dict]:
    full = statistics.median(measure("full") for _ in range(repeats))
    frozen = statistics.median(measure("frozen") for _ in range(repeats))
    print(
        f"ResNet-50, batch 32, 224 px: training memory above the model: full fine-tune {full:.0f} MiB, "
        f"stem..layer3 frozen {frozen:.0f} MiB -> ratio {frozen / full:.2f} (target <= 0.6)"
    )
    return [
        {
            "figure": "training memory, stem..layer3 frozen / full fine-tune (ResNet-50, batch 32, 224 px)",
            "measured": f"{frozen:.0f} vs {full:.0f} MiB",
            "ratio": frozen / full,
            "target": "<= 0.6",
            "met": frozen / full <= 0.6,
        }
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    run(repeats=args.repeats)


if __name__ == "__main__":
    main()
