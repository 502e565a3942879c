"""Bad data: an ImageFolder full of broken, odd and hostile files trains to the end, naming what it skipped;
an empty or missing dataset fails at the start with one line."""
from __future__ import annotations

import contextlib
import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_zoo import run as run_cli
from ssl_zoo.data.datasets import build_image_folder, open_rgb
from ssl_zoo.data.transforms import DefaultTransform
from tests.conftest import TOY, read_metrics

TINY_TOY = [*TOY, "trainer.device=cpu", "data.image_size=32", "data.num_workers=0", "trainer.log_every=1"]


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels: a decompression bomb to any reader that
    allocates before checking."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def odd_but_readable(folder: Path) -> dict[str, Path]:
    """Images in every mode that decodes to RGB, each with a known mean brightness of about 128."""
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.tile(np.linspace(0, 255, 40), (30, 1))
    files = {"cmyk.jpg": Image.fromarray(ramp.astype(np.uint8)).convert("CMYK"),
             "palette.png": Image.fromarray(ramp.astype(np.uint8)).convert("P"),
             "rgba.png": Image.fromarray(ramp.astype(np.uint8)).convert("RGBA"),
             "grey16.png": Image.fromarray((ramp * 257).astype(np.uint16))}
    paths = {}
    for name, img in files.items():
        img.save(folder / name)
        paths[name] = folder / name
    frames = [Image.fromarray(np.full((30, 40), v, np.uint8)).convert("P") for v in (128, 10, 250)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    paths["animated.gif"] = folder / "animated.gif"
    return paths


def broken(folder: Path, good: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (folder / "truncated.png").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    (folder / "text.jpg").write_text("not an image\n")
    (folder / "notes.txt").write_text("a non-image file, not even listed\n")
    return ["corrupt.jpg", "truncated.png", "empty.png", "bomb.png", "text.jpg"]


def test_every_readable_mode_decodes_to_8_bit_rgb(tmp_path: Path) -> None:
    for name, path in odd_but_readable(tmp_path).items():
        img = open_rgb(path)
        assert img.mode == "RGB" and img.size == (40, 30), name
        assert 100 < np.asarray(img).mean() < 156, name  # not clipped white (16-bit), not black (alpha)


@pytest.mark.e2e
def test_an_image_folder_of_bad_files_trains_to_the_end_naming_them(cli, tmp_path: Path) -> None:
    root = tmp_path / "images"
    for i in range(12):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40, 30), (i * 20, 90, 200 - i * 15)).save(root / f"class{i % 2}" / f"good{i}.png")
    odd_but_readable(root / "class0")
    skipped = broken(root / "class1", root / "class0" / "good0.png")
    dataset = build_image_folder(type("S", (), {"root": str(root)})(), DefaultTransform(32), seed=0)
    # one global batch is the whole folder, so every file is read in the first step
    proc = cli(*TINY_TOY, "data=image_folder", f"data.root={root}", f"trainer.batch_size={len(dataset)}",
               "trainer.max_steps=2", "output_dir=run", cwd=tmp_path)
    rows = read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and (tmp_path / "run" / "summary.json").exists()
    assert rows[0]["skipped_images"] >= len(skipped)
    for name in skipped:
        assert name in proc.stderr, name
    for name in ("cmyk.jpg", "palette.png", "rgba.png", "grey16.png", "animated.gif", "notes.txt"):
        assert name not in proc.stderr, name


@pytest.mark.parametrize("layout", ["missing", "empty", "only_text"])
def test_a_missing_or_empty_dataset_fails_at_the_start_in_one_line(tmp_path: Path, layout: str) -> None:
    root = tmp_path / "data"
    if layout != "missing":
        (root / "cls").mkdir(parents=True)
    if layout == "only_text":
        (root / "cls" / "readme.txt").write_text("no images here\n")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = run_cli.main([*TINY_TOY, "data=image_folder", f"data.root={root}", f"output_dir={tmp_path / 'run'}"])
    lines = err.getvalue().strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "data.root" in lines[0], lines
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
