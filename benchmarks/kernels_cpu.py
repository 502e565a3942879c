"""CPU benchmark of the fused-kernel package against its peers, each variant in its own process.

    python -m benchmarks.kernels_cpu                 # all variants, prints a table, appends RESULTS.md
    python -m benchmarks.kernels_cpu --no-append     # print only
    python -m benchmarks.kernels_cpu --variant NAME  # one variant in this process, JSON on stdout
    python -m benchmarks.kernels_cpu --pair OURS PEER  # alternate two variants in this process, JSON

Lookup at N=32768, K=8192, D=256 (fp32): ours (``vq_nearest``, which on CPU hands the search to faiss
when it imports), our own tiled PyTorch path (``vq_nearest_torch``), faiss-cpu IndexFlatL2
(index built inside the timed region, as our call prepares ||e||^2 inside it), torch.cdist + argmin, and a
bare ``z @ e.T``. Loss at M=32768 counted rows, H=768, V=8192 (fp32), forward + backward: ours
(``masked_linear_cross_entropy``, PyTorch path), PyTorch's chunked ``F.linear_cross_entropy(...,
options=LinearCrossEntropyOptions())``, full logits + ``F.cross_entropy``, and the three bare GEMMs that
any forward + backward must run (6MHV flops). The loss input is a PeCo-like (256, 196, 768) batch with
exactly 128 masked tokens per image, and every variant starts from it (peers gather ``hidden[mask]``
inside the timed region, as ours does).

Other processes may share the cores: besides the per-variant processes (rotated rounds, ratios taken
within a round), each of our variants is also timed against its peer alternately in one process
(``--pair``), the comparison that load bursts disturb least.

Peak memory: each variant runs in a fresh process; after its inputs exist, the kernel's peak-RSS mark
is reset (``/proc/self/clear_refs`` = 5) and the reported figure is VmHWM minus the RSS at that moment,
i.e. the most memory the variant ever added on top of its inputs (warm-up run included). This counts
every allocator (PyTorch, faiss, BLAS workspaces), which tracemalloc would not see.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

N, K, D = 32768, 8192, 256
B, L, H, V, MASKED = 256, 196, 768, 8192, 128  # M = B * MASKED = 32768 counted rows
RESULTS = Path(__file__).with_name("RESULTS.md")
VARIANTS = {
    "lookup": ["vq_ours", "vq_ours_tiles", "vq_faiss", "vq_cdist_argmin", "vq_matmul"],
    "loss": ["ce_ours", "ce_torch_chunked", "ce_naive", "ce_matmul_x3"],
}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0) and return that RSS in kB."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_kb("VmRSS")


def _lookup_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randn(K, D, generator=g)


def _loss_inputs():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(B, L, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) / H**0.5).requires_grad_()
    bias = torch.zeros(V).requires_grad_()
    targets = torch.randint(0, V, (B, L), generator=g)
    order = torch.rand(B, L, generator=g).argsort(1)
    mask = torch.zeros(B, L, dtype=torch.bool).scatter_(1, order[:, :MASKED], True)
    return hidden, weight, bias, targets, mask


def _make(variant: str) -> Callable[[], object]:
    """Build the inputs of ``variant`` and return the zero-argument callable to time."""
    if variant.startswith("vq_"):
        z, e = _lookup_inputs()
        if variant == "vq_ours":
            from ssl_zoo_kernels import vq_nearest

            return lambda: vq_nearest(z, e, "l2")[0]
        if variant == "vq_ours_tiles":
            from ssl_zoo_kernels.vq_lookup import vq_nearest_torch

            return lambda: vq_nearest_torch(z, e, "l2")[0]
        if variant == "vq_faiss":
            import faiss

            zn, en = z.numpy(), e.numpy()

            def run():
                index = faiss.IndexFlatL2(D)
                index.add(en)
                return torch.from_numpy(index.search(zn, 1)[1][:, 0]).long()

            return run
        if variant == "vq_cdist_argmin":
            return lambda: torch.cdist(z, e).argmin(1)
        if variant == "vq_matmul":
            return lambda: z @ e.t()
    hidden, weight, bias, targets, mask = _loss_inputs()
    params = (hidden, weight, bias)

    def step(loss_fn):
        def run():
            for p in params:
                p.grad = None
            loss = loss_fn()
            loss.backward()
            return loss.detach()

        return run

    if variant == "ce_ours":
        from ssl_zoo_kernels import masked_linear_cross_entropy

        return step(lambda: masked_linear_cross_entropy(hidden, weight, bias, targets, mask))
    if variant == "ce_torch_chunked":
        opts = torch.nn.LinearCrossEntropyOptions()
        return step(lambda: F.linear_cross_entropy(hidden[mask], weight, targets[mask], linear_bias=bias, options=opts))
    if variant == "ce_naive":
        return step(lambda: F.cross_entropy(F.linear(hidden[mask], weight, bias), targets[mask]))
    if variant == "ce_matmul_x3":
        x = hidden.detach()[mask]
        w = weight.detach()
        g = torch.empty(x.shape[0], V)

        def run():
            torch.mm(x, w.t(), out=g)
            return torch.mm(g, w), torch.mm(g.t(), x)

        return run
    raise ValueError(f"unknown variant {variant!r}")


def run_variant(variant: str, repeats: int, picks_out: str | None) -> dict:
    """Time ``variant`` in this process: one warm-up, then ``repeats`` timed runs."""
    fn = _make(variant)
    base_kb = _reset_peak_rss()
    out = fn()  # warm-up (first-touch page faults, BLAS init) counts towards peak memory, not time
    times = []
    for _ in range(repeats):
        out = None  # drop the previous result first, or two outputs would count towards the peak
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    peak_kb = _status_kb("VmHWM") - base_kb
    if picks_out and isinstance(out, torch.Tensor) and out.dtype == torch.int64:
        np.save(picks_out, out.numpy())
    result = {"variant": variant, "median_s": statistics.median(times), "min_s": min(times), "peak_mb": peak_kb / 1024}
    if variant.startswith("ce_") and variant != "ce_matmul_x3":
        result["loss"] = float(out)
    return result


PAIRS = [("vq_ours", "vq_faiss"), ("vq_ours_tiles", "vq_faiss"), ("ce_ours", "ce_torch_chunked")]


def median_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Distribution-free confidence interval of the median: the order statistics (j, n + 1 - j) with the
    largest j whose binomial(n, 1/2) tail is at most (1 - level) / 2. With fewer than 6 values no
    interval reaches 95%, and the full range is returned."""
    xs, n = sorted(values), len(values)
    j, tail = 0, 0.0
    while j < n // 2:
        tail += math.comb(n, j) / 2**n
        if tail > (1 - level) / 2:
            break
        j += 1
    j = max(j, 1)
    return xs[j - 1], xs[n - j]


def run_paired(ours: str, peer: str, alternations: int) -> dict:
    """Time ``ours`` and ``peer`` alternately in one process (order flipped each time) and return the
    median of the per-alternation time ratios with its 95% interval. Runs seconds apart see the same load
    from other processes, which the per-variant processes, minutes apart, do not; memory is not measured."""
    fa, fb = _make(ours), _make(peer)
    fa(), fb()  # warm-up both
    ratios = []
    for i in range(alternations):
        took = {}
        for name, fn in ((ours, fa), (peer, fb)) if i % 2 == 0 else ((peer, fb), (ours, fa)):
            t0 = time.perf_counter()
            fn()
            took[name] = time.perf_counter() - t0
        ratios.append(took[ours] / took[peer])
    return {"ours": ours, "peer": peer, "median_ratio": statistics.median(ratios),
            "interval_95": median_interval(ratios), "ratios": ratios}


def _machine() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"


REFERENCES = {"lookup": ("vq_faiss", "vq_cdist_argmin", "vq_matmul"), "loss": ("ce_torch_chunked", "ce_naive", "ce_matmul_x3")}


def _paired_ratio(runs: dict[str, list[dict]], name: str, ref: str, key: str) -> str:
    """Median over rounds of (name / ref) within each round: both ran minutes apart under the same load."""
    pairs = [a[key] / b[key] for a, b in zip(runs.get(name, []), runs.get(ref, [])) if b[key] > 0]
    return f"{statistics.median(pairs):.2f}" if pairs else "-"


def _table(runs: dict[str, list[dict]], agree: dict[str, float]) -> str:
    """Markdown table: per variant the median over rounds of its per-process median time (fastest single
    run in brackets), paired time ratios, and the largest peak over its processes."""
    lines = ["| op | variant | median s (fastest) | x peer time | x bare matmul | peak extra MB | x peer mem | x naive mem |",
             "|---|---|---|---|---|---|---|---|"]
    for op, names in VARIANTS.items():
        peer, naive, bare = REFERENCES[op]
        for name in names:
            if name not in runs:
                continue
            rs = runs[name]
            med = statistics.median(r["median_s"] for r in rs)
            fastest = min(r["min_s"] for r in rs)
            peak = max(r["peak_mb"] for r in rs)
            peak_of = {n: max(r["peak_mb"] for r in runs[n]) for n in (peer, naive) if n in runs}
            mem_ratio = {n: f"{peak / v:.2f}" if v > 0 else "-" for n, v in peak_of.items()}
            lines.append(f"| {op} | {name} | {med:.3f} ({fastest:.3f}) | {_paired_ratio(runs, name, peer, 'median_s')} | "
                         f"{_paired_ratio(runs, name, bare, 'median_s')} | {peak:.0f} | {mem_ratio.get(peer, '-')} | "
                         f"{mem_ratio.get(naive, '-')} |")
    notes = [f"Lookup picks of {name} equal faiss IndexFlatL2's on {share * 100:.4f}% of the {N} queries."
             for name, share in agree.items()]
    losses = {name: rs[-1]["loss"] for name, rs in runs.items() if "loss" in rs[-1]}
    if losses:
        notes.append("Loss values: " + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()) + ".")
    return "\n".join(lines) + ("\n\n" + " ".join(notes) if notes else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", help="run one variant in this process and print JSON")
    parser.add_argument("--only", choices=sorted(VARIANTS), help="run only the lookup or the loss variants")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per process (after one warm-up)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="processes per variant, interleaved across variants (ratios are taken within a round)")
    parser.add_argument("--pair", nargs=2, metavar=("OURS", "PEER"), help="alternate two variants in this process")
    parser.add_argument("--alternations", type=int, default=6, help="alternations per pair (ours then peer, flipped)")
    parser.add_argument("--picks-out", help=argparse.SUPPRESS)
    parser.add_argument("--no-append", action="store_true", help="do not append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.repeats, args.picks_out)))
        return
    if args.pair:
        print(json.dumps(run_paired(*args.pair, args.alternations)))
        return
    runs: dict[str, list[dict]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        # Rounds interleave the variants, starting each round at the next variant, so a burst of load from
        # other processes hits them alike; ratios are then taken within a round.
        for rnd in range(args.rounds):
            for op, names in VARIANTS.items():
                if args.only and op != args.only:
                    continue
                for name in names[rnd % len(names):] + names[: rnd % len(names)]:
                    cmd = [sys.executable, "-m", "benchmarks.kernels_cpu", "--variant", name, "--repeats",
                           str(args.repeats), "--picks-out", os.path.join(tmp, f"{name}.npy")]
                    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
                    if proc.returncode != 0:
                        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
                    runs.setdefault(name, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
                    print(f"round {rnd}: {runs[name][-1]}", flush=True)
        agree = {name: float((np.load(Path(tmp, f"{name}.npy")) == np.load(Path(tmp, "vq_faiss.npy"))).mean())
                 for name in ("vq_ours", "vq_ours_tiles") if Path(tmp, f"{name}.npy").exists() and Path(tmp, "vq_faiss.npy").exists()}
        paired = []
        for ours, peer in PAIRS:
            if args.only and ours not in VARIANTS[args.only]:
                continue
            cmd = [sys.executable, "-m", "benchmarks.kernels_cpu", "--pair", ours, peer, "--alternations",
                   str(args.alternations)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if proc.returncode != 0:
                raise SystemExit(f"pair {ours}/{peer} failed:\n{proc.stderr[-3000:]}")
            paired.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"paired: {paired[-1]}", flush=True)
    load = f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
    table = _table(runs, agree)
    if paired:
        table += (f"\n\nPaired timing, one process per pair, {args.alternations} alternations (order flipped each "
                  "time), median of the per-alternation time ratios and its distribution-free 95% interval:\n\n"
                  "| ours | peer | time ratio | 95% interval | ratios |\n|---|---|---|---|---|\n")
        table += "\n".join(f"| {p['ours']} | {p['peer']} | {p['median_ratio']:.3f} | "
                            f"{p['interval_95'][0]:.3f}-{p['interval_95'][1]:.3f} | "
                            f"{' '.join(f'{r:.2f}' for r in p['ratios'])} |" for p in paired)
    print(table)
    if not args.no_append:
        command = "python -m benchmarks.kernels_cpu " + " ".join(sys.argv[1:])
        stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
        header = (f"\n## Kernels, CPU ({stamp})\n\nMachine: {_machine()}; {load} (other work shared the cores). "
                  f"Command: `{command.strip()}`: each variant in its own process, {args.repeats} timed runs after a "
                  f"warm-up, {args.rounds} interleaved rounds; times are medians over rounds, ratios medians of "
                  f"within-round ratios, peaks the largest over rounds.\n\n")
        with RESULTS.open("a") as f:
            f.write(header + table + "\n")


if __name__ == "__main__":
    main()
