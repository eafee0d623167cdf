"""What claim 8 at a budget where the models train would cost here: the training FLOPs of one
Fashion-MNIST sample (forward + backward, ``torch.utils.flop_counter.FlopCounterMode``, exact and
load-independent) and the time of a few training steps, for full-width ResNet-20 Bi-Real (double
skip) next to the promise's models, in ONE process (ratios measured together, so the machine's
load cancels out). docs/reproduction.md turns the ratios into the cost of the claim-8 grid using
the promise run's measured epoch times.

The step is bnnshift's default trainer step (fused Adam 1e-3, batch 256, eager forward + loss +
backward, channels_last for convolutions), after ``--warmup`` untimed steps; the median of
``--steps`` timed steps is reported (``--steps 0``: FLOPs only).

    python benchmarks/reproduce/claim8_cost.py --threads 1
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from bnnshift.train import default_optimizer  # noqa: E402

MODELS = [  # label, zoo, args
    ("mlp", "mlp", {}),
    ("lenet5", "lenet5", {}),
    ("vgg-small w0.25", "vgg-small", {"width": 0.25}),
    ("resnet20-bireal w1 (claim 8)", "resnet20-bireal", {}),
    ("resnet20-bireal-prelu w1 (claim 8)", "resnet20-bireal-prelu", {}),
]
# claim 8 at full size: 5 followers (none, PReLU, LeakyReLU 0 / 0.5 / 0.9) x t in {0, +0.5} x 3 seeds
GRID_RUNS = 5 * 2 * 3


def main() -> None:
    ap = C.parser(__doc__)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()
    out = C.setup(args)
    t0 = time.perf_counter()
    shape = C.data_shape(args.data)
    b = C.data_bundle(args.data, shape, 4096, 0)
    per_epoch = 60000 // 256
    rows = {}
    for label, zoo, extra in MODELS:
        torch.manual_seed(0)
        m = C.factory(zoo, C.model_args(shape, {"input_size": shape[1], **extra}))()
        conv = any(isinstance(x, torch.nn.Conv2d) for x in m.modules())
        if conv:
            m = m.to(memory_format=torch.channels_last)
        opt = default_optimizer(m, "adam", 1e-3, 0.0, None)
        m.train()
        with FlopCounterMode(display=False) as fc:
            F.cross_entropy(m(b.train_x[:2]), b.train_y[:2]).backward()
        flops = fc.get_total_flops() / 2
        opt.zero_grad(set_to_none=True)
        times = []
        steps = 1 if args.quick else args.steps
        for i in range(steps + (0 if args.quick else args.warmup)):
            xb, yb = b.train_x[i * 256 % 3840:][:256], b.train_y[i * 256 % 3840:][:256]
            if conv:
                xb = xb.contiguous(memory_format=torch.channels_last)
            s = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(xb), yb).backward()
            opt.step()
            times.append(time.perf_counter() - s)
        step = statistics.median(times[-steps:]) if steps else None
        rows[label] = {"zoo": f"zoo:{zoo}", "args": extra, "train_flops_per_sample": flops,
                       "step_seconds": None if step is None else round(step, 4),
                       "epoch_seconds": None if step is None else round(step * per_epoch, 1),
                       "params": sum(p.numel() for p in m.parameters())}
        print(f"{label}: {flops / 1e6:.1f} MFLOP/sample (fwd+bwd)"
              + ("" if step is None else f", {step:.3f} s/step, {step * per_epoch:.0f} s/epoch (1 thread, this load)"),
              file=sys.stderr)
    for key in ("train_flops_per_sample", "step_seconds"):
        base = rows["mlp"][key]
        for r in rows.values():
            r[f"{key}_ratio_to_mlp"] = None if not base or r[key] is None else round(r[key] / base, 2)
    payload = {"claim": "8-cost", "title": "cost of claim 8 at full ResNet-20 width, from measured step times",
               "models": rows, "grid_runs": GRID_RUNS, "steps_per_epoch": per_epoch}
    payload.update(C.meta(args, seeds=[0], settings={"steps": args.steps, "warmup": args.warmup}, t0=t0))
    payload["torch_threads"] = torch.get_num_threads()
    C.write_json(out / "claim8_cost.json", payload)


if __name__ == "__main__":
    main()
