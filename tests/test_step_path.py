"""The step path: no host synchronisation between log steps; a non-finite step is skipped on the device and
counted, and `trainer.max_bad_steps` of them in a row stop the run keeping its last checkpoint; skipped images
are summed over ranks and survive a resume; `trainer.precision=auto` picks bf16 only where it is fast."""
from __future__ import annotations

import contextlib
import importlib
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
import torch
from PIL import Image

import ssl_zoo.train as train_lib
from ssl_zoo.config import load_config
from ssl_zoo.engine.strategy import auto_precision, build_strategy
from ssl_zoo.registry import METHODS
from tests.conftest import TOY, read_metrics
from tests.peco.test_methods import TINY as PECO_TINY

#: the Python-level ways to read a tensor's value on the host (each waits for the device)
SYNC_CALLS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")
SMALL = ["trainer.batch_size=8", "data.num_workers=0", "trainer.checkpoint_every=1000", "trainer.warmup_steps=1"]


@contextlib.contextmanager
def counting_syncs(counts: Counter) -> Iterator[dict[str, bool]]:
    """Count calls of `SYNC_CALLS` on tensors while `state["on"]` is set."""
    state = {"on": False}
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_CALLS}

    def counted(name: str, fn):
        def wrapper(self, *args, **kwargs):
            if state["on"]:
                counts[name] += 1
            return fn(self, *args, **kwargs)
        return wrapper

    for name, fn in originals.items():
        setattr(torch.Tensor, name, counted(name, fn))
    try:
        yield state
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def paused_while(state: dict[str, bool], fn):
    def wrapper(*args, **kwargs):
        state["on"], was = False, state["on"]
        try:
            return fn(*args, **kwargs)
        finally:
            state["on"] = was
    return wrapper


def syncs_in_the_loop(monkeypatch, out: Path, steps: int, overrides: list[str],
                      uncounted: tuple[str, ...] = ()) -> Counter:
    """Synchronising calls made by the training loop (data loading and the `uncounted` functions, as
    "module:name", excluded) in a run of `steps` steps that logs at its last step only."""
    cfg = load_config([*overrides, *SMALL, f"trainer.max_steps={steps}", f"trainer.log_every={steps}",
                       f"output_dir={out}"])
    counts: Counter = Counter()
    with counting_syncs(counts) as state:
        real_loop, real_loader = train_lib._loop, train_lib.make_loader

        def loop(*args, **kwargs):
            state["on"] = True
            try:
                return real_loop(*args, **kwargs)
            finally:
                state["on"] = False

        def loader(*args, **kwargs):
            batches = real_loader(*args, **kwargs)

            def paused():
                while True:
                    state["on"], was = False, state["on"]
                    batch = next(batches)
                    state["on"] = was
                    yield batch
            return paused()

        for target in uncounted:
            module, name = target.split(":")
            monkeypatch.setattr(f"{module}.{name}", paused_while(state, getattr(importlib.import_module(module), name)))
        monkeypatch.setattr(train_lib, "_loop", loop)
        monkeypatch.setattr(train_lib, "make_loader", loader)
        train_lib.train(cfg)
    return counts


@pytest.fixture
def peco_overrides(tmp_path) -> list[str]:
    """PeCo stage 2 at a tiny size, on a tokenizer with random weights (its cost does not depend on them)."""
    from benchmarks.throughput_step import _random_tokenizer

    overrides = ["method=peco", *PECO_TINY, "data=synthetic"]
    return [*overrides, f"method.tokenizer.checkpoint='{_random_tokenizer(load_config(overrides), tmp_path)}'"]


@pytest.mark.parametrize("method", ["toy", "peco", "peco_soft_targets"])
def test_no_host_synchronisation_between_log_steps(monkeypatch, tmp_path, request, method) -> None:
    """The same number of synchronising calls in a run of 2 steps and one of 6 (each logging once): the steps
    in between add none. `.item()` in a method's metrics, the old per-step loss read or a per-step check
    of the loss would each add one per step."""
    overrides, uncounted = TOY, ()
    if method.startswith("peco"):
        overrides = request.getfixturevalue("peco_overrides")
        if method == "peco_soft_targets":
            overrides = [*overrides, "method.soft_target_temperature=1.0"]
        monkeypatch.setattr("ssl_zoo_kernels.vq_lookup.faiss", None)  # faiss runs on the host by nature (CPU)
        # known, not yet removed: the tokenizer's lookup checks its codebook for duplicates on every call
        # (one read per step, also on GPUs), though stage 2's codebook is frozen
        uncounted = ("ssl_zoo_kernels.vq_lookup:unique_codes",)
    short = syncs_in_the_loop(monkeypatch, tmp_path / "short", 2, overrides, uncounted)
    long = syncs_in_the_loop(monkeypatch, tmp_path / "long", 6, overrides, uncounted)
    assert sum(short.values()) > 0  # the counting works: the log step reads its values
    assert long == short


def test_a_non_finite_step_changes_nothing_and_training_goes_on(tmp_path) -> None:
    cfg = load_config([*TOY, *SMALL, "method.nan_from_step=1", "method.nan_steps=1", f"output_dir={tmp_path}"])
    torch.manual_seed(0)
    strategy = build_strategy(cfg, METHODS.get(cfg.method.name)(cfg), torch.device("cpu"))
    batch = {"image": torch.rand(8, 3, 32, 32)}

    def snapshot() -> list[torch.Tensor]:
        states = [t for s in strategy.optimizer.state.values() for t in s.values()]
        return [t.detach().clone() for t in [*strategy.method.parameters(), *states]]

    assert not strategy.step([batch], 0).skipped
    before = snapshot()
    bad = strategy.step([batch], 1)
    assert bad.skipped and not torch.isfinite(bad.loss)
    assert all(torch.equal(a, b) for a, b in zip(before, snapshot()))  # weights, moments and step counts
    assert not strategy.step([batch], 2).skipped
    assert not all(torch.equal(a, b) for a, b in zip(before, snapshot()))


def test_bad_steps_are_counted_and_too_many_in_a_row_stop_the_run(cli, tmp_path) -> None:
    common = [*TOY, *SMALL, "trainer.max_steps=12", "trainer.log_every=2", "trainer.max_bad_steps=3",
              "trainer.checkpoint_every=4"]
    cli(*common, "method.nan_from_step=3", "method.nan_steps=2", "output_dir=few", cwd=tmp_path)
    rows = read_metrics(tmp_path / "few")
    assert [r.get("skipped_steps", 0) for r in rows] == [0, 1, 2, 2, 2, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows[2:])

    proc = cli(*common, "method.nan_from_step=5", "method.nan_steps=100", "output_dir=many", cwd=tmp_path,
               check=False)
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith("error: 3 steps in a row had a non-finite loss") and "max_bad_steps=3" in message
    assert "stopped at step 8" in message and "step-00000004" in message
    checkpoints = tmp_path / "many" / "checkpoints"
    assert (checkpoints / "last").read_text().strip() == "step-00000004"
    assert not (checkpoints / "step-00000008").exists() and not (tmp_path / "many" / "summary.json").exists()


@pytest.mark.deepspeed
def test_deepspeed_skips_and_counts_bad_steps(cli, tmp_path) -> None:
    cli(*TOY, *SMALL, "strategy=deepspeed", "trainer.max_steps=6", "trainer.log_every=2",
        "method.nan_from_step=2", "method.nan_steps=1", "output_dir=ds", cwd=tmp_path)
    rows = read_metrics(tmp_path / "ds")
    assert [r.get("skipped_steps", 0) for r in rows] == [0, 1, 1]


def test_skipped_images_are_summed_over_ranks_and_survive_a_resume(cli, tmp_path) -> None:
    """22 files, 2 of them unreadable (not neighbours in sorted order), 2 ranks x 11 images: every step is
    one epoch, reading each file once, so exactly 2 are skipped per step, over all ranks. (With seed 0 the
    ranks share them 1:3 over the first 4 steps, so rank 0's count alone would read 1, 4.)"""
    images = tmp_path / "images"
    images.mkdir()
    for i in range(20):
        Image.new("RGB", (40, 40), (i * 12, 100, 200 - i * 9)).save(images / f"img{i:02d}.png")
    (images / "img05_broken.jpg").write_bytes(b"not a jpeg at all")
    (images / "img12_truncated.png").write_bytes((images / "img00.png").read_bytes()[:40])
    common = [*TOY, "data=flat_folder", f"data.root={images}", "data.image_size=32", "data.num_workers=0",
              "trainer.batch_size=11", "launcher.nprocs=2", "trainer.log_every=2", "trainer.checkpoint_every=2",
              "output_dir=run"]
    cli(*common, "trainer.max_steps=4", cwd=tmp_path)
    assert [r["skipped_images"] for r in read_metrics(tmp_path / "run")] == [4, 8]
    out = cli(*common, "trainer.max_steps=6", cwd=tmp_path).stdout
    assert "resuming from" in out
    assert [r["skipped_images"] for r in read_metrics(tmp_path / "run")] == [4, 8, 12]


@pytest.mark.parametrize("device, flags, cuda_bf16, expected", [
    ("cpu", {"avx512f", "amx_bf16", "amx_tile"}, False, "bf16"),  # Sapphire Rapids and later
    ("cpu", {"avx512f", "avx512_bf16"}, False, "bf16"),  # Cooper Lake, Zen 4
    ("cpu", {"avx512f", "avx512_vnni", "avx2"}, False, "fp32"),  # Ice Lake: bf16 only emulated
    ("cpu", {"avx2", "fma"}, True, "fp32"),
    ("cuda", set(), True, "bf16"),
    ("cuda", {"amx_bf16"}, False, "fp32"),  # a GPU without bf16 (V100): the host's flags do not matter
])
def test_auto_precision_picks_bf16_where_it_is_fast(device, flags, cuda_bf16, expected) -> None:
    chosen, why = auto_precision(device, flags, cuda_bf16)
    assert chosen == expected and why


def test_mim_head_gathers_the_masked_rows_as_boolean_indexing_would() -> None:
    """The head's sort-based gather (fixed count per mask, no host read) gives the loss, accuracy and
    gradients of the boolean-mask path of the kernel."""
    import ssl_zoo_kernels
    from ssl_zoo_peco.mim_method import MimHead

    torch.manual_seed(0)
    head = MimHead(16, 32, "torch", num_masked=3)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    for row in mask:
        row[torch.randperm(10)[:3]] = True
    targets = torch.randint(0, 32, (4, 10))
    hidden = torch.randn(4, 11, 16, requires_grad=True)
    rows = head.masked_rows(mask)
    masked_hidden = hidden[:, 1:].gather(1, rows[..., None].expand(-1, -1, 16))
    loss, accuracy = head(masked_hidden, targets.gather(1, rows), 0.1)
    loss.backward()
    ours = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = head.bias.grad = None
    ref_loss, ref_accuracy = ssl_zoo_kernels.masked_linear_cross_entropy(
        hidden[:, 1:], head.weight, head.bias, targets, mask=mask, label_smoothing=0.1, impl="torch",
        return_accuracy=True)
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss) and torch.equal(accuracy, ref_accuracy)
    assert torch.allclose(ours[0], hidden.grad, atol=1e-6) and torch.allclose(ours[1], head.weight.grad, atol=1e-6)
