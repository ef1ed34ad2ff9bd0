"""Performance suite (not a test): throughput of every loop of the study, side by side with the
classic per-sample path and with each of our speed features switched off in turn, in one process.

For supervised training, SSL pretraining (SimCLR, MoCo), feature extraction and linear probing
(and, with --study, whole studies of a profile, several datasets at once) it prints one table and
writes it as JSON: images/s (image pairs/s for SSL), wall time, peak memory, device, and for the training loops the
achieved FLOP rate as a fraction of the matrix-multiply rate measured in the same run. The matmul
rate is sampled right before and right after every training measurement and their mean is that
measurement's reference: on a shared (virtual) machine the rate drifts by a third within minutes,
and a reference taken at another moment would credit or blame the loop for its neighbours' load.

    python bench/perf.py [--device auto] [--dataset pneumoniamnist] [--models smallcnn,resnet18]
                         [--min-time 3] [--compile resnet18/simclr] [--study] [--out bench/results/perf-cpu.json]
    python bench/perf.py --workloads none --study --study-profile full --study-dataset breastmnist,pneumoniamnist [--study-store DIR]

Paths per training workload:
  ours               device-resident uint8 data, batched on-device augmentation, channels_last,
                     no host sync per step, autocast (bf16; fp16 before Ampere) + cuDNN autotuning on CUDA
  pipeline epoch     the shipped epoch function (pipeline.train.train_epoch / an epoch of pretrain.StepTrainer steps)
  -<feature>         ours with that one feature switched off
  +compile           ours with the encoder under torch.compile (--compile model/workload)
  per-sample wN      medmnist Dataset + torchvision transforms + DataLoader(num_workers=N), as in
                     MedMNIST's official training script (N=0), same model, batch and optimizer
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from harness import Roofline, Row, cpu_steal, markdown, steal_fraction, table  # noqa: E402
from study_timing import study_rows  # noqa: E402
from workloads import MODELS, TRAINING_WORKLOADS, feature_rows, probe_rows, training_rows  # noqa: E402

from pipeline.data import load_splits  # noqa: E402
from pipeline.runtime import configure_speed, resolve_device  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dataset", default="pneumoniamnist", help="data of the loop rows")
    parser.add_argument("--data-root", default="")
    parser.add_argument("--models", default="smallcnn,resnet18", help=f"comma list of {', '.join(MODELS)} (resnet18 = CIFAR stem)")
    parser.add_argument("--workloads", default="supervised,simclr,moco,features,probe")
    parser.add_argument("--batch", type=int, default=128, help="supervised batch (the baseline default)")
    parser.add_argument("--ssl-batch", type=int, default=256, help="SSL batch in image pairs (the ssl_pretrain default)")
    parser.add_argument("--eval-batch", type=int, default=1024)
    parser.add_argument("--probe-epochs", type=int, default=10, help="epochs of the classic linear-probe reference")
    parser.add_argument("--workers", default="0,2", help="DataLoader workers of the per-sample reference paths")
    parser.add_argument("--min-time", type=float, default=3.0, help="seconds each path is timed for (at least)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each path")
    parser.add_argument(
        "--matmul-seconds", type=float, default=0.0, help="length of each matmul sample around a training measurement (default 0.2 s on CUDA, 0.5 s on the CPU)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="measurements of each training path (best kept)")
    parser.add_argument("--compile", default="", help="model/workload pairs also measured under torch.compile, e.g. resnet18/simclr (compiling takes a minute each)")
    parser.add_argument("--study", action="store_true", help="also time a whole study (subprocess, fresh store)")
    parser.add_argument("--study-dataset", default="breastmnist", help="comma list: the studies run at once")
    parser.add_argument("--study-profile", default="quick")
    parser.add_argument("--study-store", default="", help="folder of the studies' tracking store, kept and reused across calls (default: a fresh temporary store)")
    parser.add_argument("--out", default="")
    parser.add_argument("--render", default="", help="print an earlier results JSON as a Markdown table and exit")
    args = parser.parse_args()
    if args.render:
        report = json.loads(Path(args.render).read_text())
        print(markdown(report["rows"], report["meta"]), end="")
        return
    args.workers = [int(w) for w in args.workers.split(",") if w != ""]
    device = resolve_device(args.device)
    configure_speed(device)
    steal_start = cpu_steal()
    workloads = args.workloads.split(",")
    roofline = Roofline(device)
    # Training rows are held to samples taken around each of them; the initial ones set the printed
    # peak, so a study-only timing (`--workloads none`) takes just one, for the record.
    for _ in range(3 if set(TRAINING_WORKLOADS) & set(workloads) else 1):
        roofline.sample(2.0)
    print(
        f"device {device}; measured matmul: fp32 {roofline.peak('fp32') / 1e12:.3f} TFLOP/s"
        + (f" (TF32), {roofline.amp} {roofline.peak('amp') / 1e12:.1f} TFLOP/s" if device.type == "cuda" else f" ({torch.get_num_threads()} threads)"),
        flush=True,
    )
    data = load_splits(args.dataset, 28, args.data_root, device)
    rows: list[Row] = []
    for name in args.models.split(","):
        for workload in TRAINING_WORKLOADS:
            if workload in workloads:
                rows += training_rows(workload, name, data, args, device, roofline)
        if "features" in workloads:
            rows += feature_rows(name, data, args, device)
        if "probe" in workloads:
            rows += probe_rows(name, data, args, device)
    out = Path(args.out or f"bench/results/perf-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.study:
        rows += study_rows(args, device, out.with_suffix(""))
    steal_end = cpu_steal()
    meta = {
        "machine": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "dataset": args.dataset,
        "matmul_tflops": {k: round(roofline.peak(k) / 1e12, 4) for k in ("fp32", "amp")},
        "matmul": roofline.summary(),
        "load_avg": os.getloadavg(),
        "cpu_steal": steal_fraction(steal_start, steal_end),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    out.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows]}, indent=2))
    print(
        f"\n{table(rows)}\n\nmatmul roofline: {meta['matmul_tflops']} TFLOP/s; {meta['gpu'] or meta['processor'] or meta['machine']}, "
        f"{meta['cpus']} CPUs, torch {meta['torch']}; written {out}"
    )
    if failed := [r.path for r in rows if r.extra.get("returncode")]:
        sys.exit(f"perf: study failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
