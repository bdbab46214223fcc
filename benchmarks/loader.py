"""The classification data loader alone: training micro-batches per second, to show it is never the bottleneck.

    python benchmarks/loader.py --preset tiny                      # the tiny preset's cache (built if missing)
    python benchmarks/loader.py --data_dir DIR --max_length 512 --consumed_samples_per_second 400

It measures exactly what the training loop pays per micro-batch: `TrainBatches` (memmapped token ids,
dynamic padding, multi-hot targets built per batch) plus the copy to the device. Given the rate the model
consumes (samples/s from a results row or from vs_hf_trainer.py), it prints the headroom; the target is 50x.
"""
from __future__ import annotations

import argparse
import sys
import time


from pathlib import Path

if not __package__:  # run as a file (python benchmarks/loader.py): the repository root is the import root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import dtype_bench  # noqa: E402,F401  (first: where the dependencies are missing it says so in one line)

import torch

from experiments.classification import data as data_lib
from dtype_bench.configs import HelpFormatter

TARGET_HEADROOM = 50.0


def loader_batches_per_second(batches: data_lib.TrainBatches, n_batches: int, device: torch.device) -> float:
    """Micro-batches per second over `n_batches`, after one untimed batch (first touch of the memmaps)."""
    next(batches).to(device)
    start = time.perf_counter()
    for _ in range(n_batches):
        batch = next(batches).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    del batch
    return n_batches / (time.perf_counter() - start)


def measure(cache_dir: str, *, batch_size: int, max_length: int, seed: int, n_batches: int,
            device: torch.device, length_grouped: bool = False) -> float:
    meta = data_lib.read_meta(cache_dir)
    split = data_lib.TokenizedSplit(meta.path, "train", max_length)
    batches = data_lib.TrainBatches(split, batch_size, seed, meta.num_labels, meta.pad_token_id,
                                    length_grouped=length_grouped)
    return loader_batches_per_second(batches, n_batches, device)


def headroom_line(loader_rate: float, samples_per_second: float, batch_size: int) -> str:
    consumed = samples_per_second / batch_size
    ratio = loader_rate / consumed
    verdict = "meets" if ratio >= TARGET_HEADROOM else "BELOW"
    return (f"loader {loader_rate:,.0f} micro-batches/s vs {consumed:,.1f} consumed by the model "
            f"({samples_per_second:.1f} samples/s at batch {batch_size}): {ratio:,.0f}x ({verdict} the "
            f"{TARGET_HEADROOM:.0f}x target)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--preset", choices=("tiny", "full"), default="tiny", help="whose cache to read")
    parser.add_argument("--data_dir", help="prepared cache (default: the preset's)")
    parser.add_argument("--batch_size", type=int, default=8, help="documents per micro-batch")
    parser.add_argument("--max_length", type=int, help="default: the cache's")
    parser.add_argument("--batches", type=int, default=1000, help="micro-batches timed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order")
    parser.add_argument("--length_grouped_batches", action="store_true", help="serve length-grouped micro-batches")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the micro-batches are copied to")
    parser.add_argument("--consumed_samples_per_second", type=float,
                        help="the model's training rate, to print the loader's headroom over it "
                             "(default: none, no headroom line)")
    args = parser.parse_args(argv)
    cache_dir = args.data_dir or f"data/classification/{'tiny' if args.preset == 'tiny' else 'eurlex57k'}"
    if args.preset == "tiny" and args.data_dir is None:
        from experiments.classification.prepare_data import prepare_tiny

        prepare_tiny(cache_dir)
    max_length = args.max_length or data_lib.read_meta(cache_dir).max_length
    rate = measure(cache_dir, batch_size=args.batch_size, max_length=max_length, seed=args.seed,
                   n_batches=args.batches, device=torch.device(args.device),
                   length_grouped=args.length_grouped_batches)
    print(f"{cache_dir}: {rate:,.0f} micro-batches/s ({rate * args.batch_size:,.0f} samples/s) at batch "
          f"{args.batch_size}, max_length {max_length}, device {args.device}")
    if args.consumed_samples_per_second:
        print(headroom_line(rate, args.consumed_samples_per_second, args.batch_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
