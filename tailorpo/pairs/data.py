"""Preference pairs (prompt, preferred image, dispreferred image) for the offline objectives (Diffusion-DPO,
MaPO, Diff-contrast), read from three kinds of source, and the exporter that turns our own sampler's ranked
images into the first kind, so online samples can train offline methods.

Sources (``read_pairs``):

- **A pair folder** (our format, written by ``export_pairs``)::

      FOLDER/pairs.jsonl      one JSON object per line: {"prompt": str, "image_w": str, "image_l": str, ...}
      FOLDER/images/...       the image files; image_w / image_l are paths relative to FOLDER

  ``image_w`` is the preferred image. Other keys (the exporter writes ``reward_w``, ``reward_l``) are kept
  for provenance and ignored by the reader. Row i is line i + 1 of ``pairs.jsonl``; blank lines are skipped.
  ``export_pairs`` ranks a rollout's images by reward; ``write_pairs`` appends pairs already ordered (the
  Pick-Style builder's: the styled image is preferred by construction).
- **Parquet** (one ``.parquet`` file, or a folder whose ``*.parquet`` shards are read in name order) with
  Pick-a-Pic v2's columns: ``caption``, ``jpg_0``, ``jpg_1`` (encoded image bytes) and ``label_0``
  (1.0: image 0 preferred, 0.0: image 1 preferred, 0.5: a tie). Row i counts across shards.
- **A Hugging Face ``datasets`` id** with the same columns (e.g. ``yuvalkirstain/pickapic_v2``), loaded with
  ``datasets.load_dataset(id, split=..., streaming=...)``, or a ``datasets.Dataset`` / ``IterableDataset``
  the caller already holds (filtered, shuffled, ``load_from_disk``...).

Rows are checked one by one, never trusted: ties (``label_0`` 0.5) are skipped and counted, before any image
is decoded. A bad row (an image that is missing, cannot be decoded or is not an 8-bit image; a missing or
malformed field; a ``label_0`` other than 0, 0.5, 1) either raises ``PairDataError`` naming the row and the fix
(``on_error="raise"``) or is logged, skipped and listed with its reason in ``reader.stats`` (``"skip"``), so a
long run never drops data silently. A source that cannot be read at all (no such path, a parquet file without
the columns) raises at once whatever the policy.

``PairDataset`` turns records into what a VAE encoder expects: RGB, the shorter side resized to the resolution
and center-cropped, float tensors in [-1, 1]; ``collate_pairs`` batches them.
"""

from __future__ import annotations

import io
import json
import logging
import numbers
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from tailorpo.core.ranking import order_by_winner, select_winner

logger = logging.getLogger(__name__)

PAIRS_FILE = "pairs.jsonl"
FOLDER_KEYS = ("prompt", "image_w", "image_l")
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")
# Modes whose RGB conversion is faithful; 16/32-bit ("I", "I;16", "F") would be clipped to 255 silently.
RGB_CONVERTIBLE = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr"}
MAX_LOGGED_BAD_ROWS = 20  # then only counted, so a broken shard cannot flood the log

OnError = Literal["skip", "raise"]


class PairDataError(ValueError):
    """A pair source or row that cannot be used; the message names the source or row and the fix."""


@dataclass
class PairRecord:
    index: int  # row of the source (see the module docstring)
    prompt: str
    image_w: Image.Image  # preferred, RGB, as stored (not resized)
    image_l: Image.Image  # dispreferred


@dataclass
class BadRow:
    index: int
    where: str  # human locator: "pairs.jsonl line 4", "shard-001.parquet row 2", "train row 7"
    reason: str


@dataclass
class PairStats:
    """Counts of the latest pass over a source: read = used + ties + bad."""

    read: int = 0
    used: int = 0
    ties: int = 0
    bad_rows: list[BadRow] = field(default_factory=list)

    @property
    def bad(self) -> int:
        return len(self.bad_rows)

    def summary(self) -> str:
        return f"{self.read} rows read: {self.used} pairs used, {self.ties} ties skipped, {self.bad} bad rows skipped"


@dataclass
class _RawRow:
    """A source row before validation; images are bytes, {"bytes", "path"} dicts, paths or PIL images."""

    index: int
    where: str
    prompt: Any = None
    image_0: Any = None
    image_1: Any = None
    label_0: Any = None  # 1.0: image_0 preferred
    columns: tuple[str, str] = ("jpg_0", "jpg_1")  # names of image_0 / image_1 in messages
    error: str | None = None  # the row could not even be parsed


class PairReader:
    """Iterates a source's valid pairs as ``PairRecord``; ``stats`` counts the latest pass. Iterating again
    re-reads the source (one pass per epoch)."""

    def __init__(self, rows: Callable[[], Iterator[_RawRow]], description: str, on_error: OnError = "skip"):
        if on_error not in ("skip", "raise"):
            raise ValueError(f"on_error={on_error!r}; choose 'skip' or 'raise'")
        self._rows = rows
        self.description = description
        self.on_error = on_error
        self.stats = PairStats()

    def __iter__(self) -> Iterator[PairRecord]:
        self.stats = stats = PairStats()
        for row in self._rows():
            stats.read += 1
            try:
                record = _validate(row)
            except _BadRow as bad:
                self._bad(row, str(bad))
                continue
            if record is None:
                stats.ties += 1
                continue
            stats.used += 1
            yield record
        log = logger.warning if stats.bad or not stats.used else logger.info
        log("pairs from %s: %s", self.description, stats.summary())

    def _bad(self, row: _RawRow, reason: str) -> None:
        self.stats.bad_rows.append(BadRow(row.index, row.where, reason))
        if self.on_error == "raise":
            raise PairDataError(
                f"{self.description}: {row.where} (row {row.index}): {reason}. Fix or remove this row, or read "
                "with on_error='skip' to skip bad rows and list them in reader.stats.bad_rows"
            )
        if self.stats.bad <= MAX_LOGGED_BAD_ROWS:
            logger.warning("skipping %s (row %d) of %s: %s", row.where, row.index, self.description, reason)
        if self.stats.bad == MAX_LOGGED_BAD_ROWS:
            logger.warning("further bad rows of %s are counted but not logged", self.description)


class _BadRow(Exception):
    pass


def _validate(row: _RawRow) -> PairRecord | None:
    """The row as a record with (winner, loser) ordered by label_0; None for a tie; _BadRow otherwise."""
    if row.error is not None:
        raise _BadRow(row.error)
    if not isinstance(row.prompt, str):
        raise _BadRow(f"the prompt is {type(row.prompt).__name__}, not a string")
    label = row.label_0
    if isinstance(label, bool) or not isinstance(label, numbers.Real) or label not in (0.0, 0.5, 1.0):
        raise _BadRow(f"label_0={label!r}; expected 1.0 (image 0 preferred), 0.0 (image 1 preferred) or 0.5 (tie)")
    if label == 0.5:
        return None
    image_0 = _decode_image(row.image_0, row.columns[0])
    image_1 = _decode_image(row.image_1, row.columns[1])
    image_w, image_l = (image_0, image_1) if label == 1.0 else (image_1, image_0)
    return PairRecord(row.index, row.prompt, image_w, image_l)


def _decode_image(value: Any, column: str) -> Image.Image:
    """Fully decoded RGB image, or _BadRow saying why not (decoding is forced here, not deferred to use)."""
    if isinstance(value, dict):  # a datasets Image feature read with decode=False
        value = value.get("bytes") or value.get("path")
    if value is None:
        raise _BadRow(f"{column} is missing")
    if isinstance(value, Image.Image):
        image = value
    elif isinstance(value, (bytes, bytearray, memoryview)):
        image = _open(io.BytesIO(value), column)
    elif isinstance(value, (str, Path)):
        if not Path(value).is_file():
            raise _BadRow(f"{column}: missing file {value}")
        image = _open(value, column)
    else:
        raise _BadRow(f"{column} is {type(value).__name__}; expected encoded image bytes or a path")
    if image.mode not in RGB_CONVERTIBLE:
        raise _BadRow(f"{column} has mode {image.mode!r}, not an 8-bit image; convert it to RGB")
    return image.convert("RGB")


def _open(file: Any, column: str) -> Image.Image:
    try:
        image = Image.open(file)
        image.load()
    except UnidentifiedImageError:  # its message names an anonymous BytesIO object
        raise _BadRow(f"{column} cannot be decoded (not an image format PIL knows, or a corrupt header)") from None
    except Exception as exc:  # noqa: BLE001 - PIL reports corrupt data as OSError, SyntaxError, ValueError...
        raise _BadRow(f"{column} cannot be decoded ({type(exc).__name__}: {exc})") from None
    return image


def read_pairs(
    source: str | os.PathLike | Any,
    *,
    on_error: OnError = "skip",
    split: str = "train",
    streaming: bool = False,
    dataset_kwargs: dict[str, Any] | None = None,
) -> PairReader:
    """A reader over a pair folder, a Pick-a-Pic-style parquet file or folder, a ``datasets`` object, or a hub
    id (``split``, ``streaming`` and ``dataset_kwargs`` go to ``datasets.load_dataset``). Local paths win over
    hub ids; a path that does not exist is taken as a hub id. Pick-a-Pic v2 is hundreds of GB: stream it."""
    if not isinstance(source, (str, os.PathLike)):
        return PairReader(_dataset_rows(source, "row"), "the given dataset", on_error)
    path = Path(source).expanduser()
    if path.is_file() and path.name == PAIRS_FILE:
        path = path.parent
    if path.is_dir() and (path / PAIRS_FILE).is_file():
        return PairReader(lambda: _folder_rows(path), str(path), on_error)
    if path.is_file() or path.is_dir():
        files = [path] if path.is_file() else sorted(path.glob("*.parquet"))
        if not files or any(f.suffix != ".parquet" for f in files):
            raise PairDataError(f"{path}: expected a folder with {PAIRS_FILE}, a .parquet file or a folder of them")
        _check_parquet_columns(files)
        return PairReader(lambda: _parquet_rows(files), str(path), on_error)
    return PairReader(
        _dataset_rows(_load_hub_dataset(str(source), split, streaming, dataset_kwargs or {}), f"{split} row"),
        f"{source} ({split})",
        on_error,
    )


def _folder_rows(folder: Path) -> Iterator[_RawRow]:
    with (folder / PAIRS_FILE).open(encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            if not line.strip():
                continue
            raw = _RawRow(index, f"{PAIRS_FILE} line {index + 1}", label_0=1.0, columns=("image_w", "image_l"))
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:
                raw.error = f"invalid JSON ({exc})"
                yield raw
                continue
            missing = [key for key in FOLDER_KEYS if not isinstance(entry, dict) or key not in entry]
            if missing:
                raw.error = f"missing field(s) {missing}; each line needs {list(FOLDER_KEYS)}"
            else:
                raw.prompt = entry["prompt"]
                # a non-string path (null, a number) stays as it is and is reported by _decode_image
                raw.image_0, raw.image_1 = (
                    folder / value if isinstance(value, str) else value
                    for value in (entry["image_w"], entry["image_l"])
                )
            yield raw


def _check_parquet_columns(files: list[Path]) -> None:
    """Fail before reading a single row if a shard lacks Pick-a-Pic's columns (reads metadata only)."""
    import pyarrow.parquet as pq

    for file in files:
        missing = [c for c in PICKAPIC_COLUMNS if c not in pq.read_schema(file).names]
        if missing:
            raise PairDataError(
                f"{file}: missing column(s) {missing}; a pair parquet needs Pick-a-Pic v2's {list(PICKAPIC_COLUMNS)}"
            )


def _parquet_rows(files: list[Path], batch_size: int = 64) -> Iterator[_RawRow]:
    import pyarrow.parquet as pq

    index = 0
    for file in files:
        row_in_file = 0
        for batch in pq.ParquetFile(file).iter_batches(batch_size=batch_size, columns=list(PICKAPIC_COLUMNS)):
            for row in batch.to_pylist():
                yield _RawRow(index, f"{file.name} row {row_in_file}", row["caption"], row["jpg_0"], row["jpg_1"],
                              row["label_0"])
                index += 1
                row_in_file += 1


def _load_hub_dataset(name: str, split: str, streaming: bool, kwargs: dict[str, Any]) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, split=split, streaming=streaming, **kwargs)
    except Exception as exc:  # hub, network and builder errors all mean "this source cannot be read"
        raise PairDataError(
            f"could not load dataset {name!r} (split {split!r}): {type(exc).__name__}: {exc}. A local source must be "
            f"a folder with {PAIRS_FILE}, a .parquet file or a folder of .parquet files"
        ) from exc


def _dataset_rows(dataset: Any, row_name: str) -> Callable[[], Iterator[_RawRow]]:
    """Rows of a ``datasets.Dataset`` / ``IterableDataset``; Image columns are read undecoded so a corrupt
    image is one bad row, not an exception inside the dataset's iterator."""
    import datasets

    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise PairDataError(f"got a dataset dict with splits {list(dataset)}; pass one split, e.g. dataset['train']")
    names = dataset.column_names  # None for a streaming dataset whose features are unknown until read
    if names is not None:
        missing = [c for c in PICKAPIC_COLUMNS if c not in names]
        if missing:
            raise PairDataError(f"dataset lacks column(s) {missing}; pair data needs {list(PICKAPIC_COLUMNS)}")
    for column in ("jpg_0", "jpg_1"):
        if dataset.features is not None and isinstance(dataset.features.get(column), datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))

    def rows() -> Iterator[_RawRow]:
        for index, row in enumerate(dataset):
            yield _RawRow(index, f"{row_name} {index}", row.get("caption"), row.get("jpg_0"), row.get("jpg_1"),
                          row.get("label_0"))

    return rows


def image_to_tensor(image: Image.Image, resolution: int) -> torch.Tensor:
    """(3, R, R) float32 in [-1, 1], the VAE encoder's input: shorter side resized to R (bilinear, as
    Diffusion-DPO's training script), then center-cropped."""
    image = image.convert("RGB")
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, int(width * scale)), max(resolution, int(height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)  # (3, R, R) in [0, 255]
    return pixels / 127.5 - 1.0


class PairDataset(torch.utils.data.IterableDataset):
    """A reader's pairs as tensors for a DataLoader (with ``collate_fn=collate_pairs``). It iterates in the main
    process only: the reader's counts of ties and bad rows would be lost in a worker's copy. Shuffling is the
    source's business (e.g. ``dataset.shuffle(seed)`` before ``read_pairs``)."""

    def __init__(self, reader: PairReader, resolution: int):
        if resolution <= 0:
            raise ValueError(f"resolution={resolution}; must be positive")
        self.reader = reader
        self.resolution = resolution

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("PairDataset must run in the main process: use a DataLoader with num_workers=0")
        for record in self.reader:
            yield {
                "index": record.index,
                "prompt": record.prompt,
                "image_w": image_to_tensor(record.image_w, self.resolution),
                "image_l": image_to_tensor(record.image_l, self.resolution),
            }


@dataclass
class PairBatch:
    index: torch.Tensor  # (B,) source rows
    prompts: list[str]
    image_w: torch.Tensor  # (B, 3, R, R) in [-1, 1]
    image_l: torch.Tensor


def collate_pairs(items: list[dict[str, Any]]) -> PairBatch:
    return PairBatch(
        index=torch.tensor([item["index"] for item in items], dtype=torch.long),
        prompts=[item["prompt"] for item in items],
        image_w=torch.stack([item["image_w"] for item in items]),
        image_l=torch.stack([item["image_l"] for item in items]),
    )


@dataclass
class ExportCounts:
    written: int
    ties: int


def export_pairs(folder: str | Path, prompts: list[str], images: torch.Tensor, rewards: torch.Tensor) -> ExportCounts:
    """Append the ranked final images of an online rollout to a pair folder: the higher-reward sample of each
    prompt becomes image_w; ties are skipped and counted. Layout as ``d3po_rollout``: rows i and B + i of
    ``images`` (2B, 3, H, W) in [0, 1] and ``rewards`` (2B,) are the two samples of ``prompts[i]``.
    Images are saved as PNG so the pixels the reward ranked are the pixels trained on (up to 8-bit rounding)."""
    batch = len(prompts)
    if images.ndim != 4 or images.shape[0] != 2 * batch or images.shape[1] != 3:
        raise ValueError(f"images are {tuple(images.shape)}; expected ({2 * batch}, 3, H, W) for {batch} prompts")
    if rewards.shape != (2 * batch,):
        raise ValueError(f"rewards have shape {tuple(rewards.shape)}; expected ({2 * batch},)")
    if images.numel() and (not torch.isfinite(images).all() or images.min() < 0 or images.max() > 1):
        raise ValueError("images must be finite and in [0, 1]")
    if not torch.isfinite(rewards).all():  # a NaN would neither win nor tie
        raise ValueError(f"rewards must be finite; got {rewards.tolist()}")
    winner_is_1, tie = select_winner(rewards[:batch], rewards[batch:])
    image_w, image_l = order_by_winner(winner_is_1, images[:batch], images[batch:])
    reward_w, reward_l = order_by_winner(winner_is_1, rewards[:batch], rewards[batch:])
    keep = (~tie).nonzero().flatten().tolist()
    provenance = [{"reward_w": float(reward_w[i]), "reward_l": float(reward_l[i])} for i in keep]
    written = write_pairs(folder, [prompts[i] for i in keep], image_w[keep], image_l[keep], provenance)
    return ExportCounts(written=written, ties=int(tie.sum()))


def write_pairs(
    folder: str | Path, prompts: list[str], image_w: torch.Tensor, image_l: torch.Tensor,
    provenance: list[dict[str, Any]],
) -> int:
    """Append already-ordered pairs to a pair folder: ``image_w[i]`` (3, H, W) in [0, 1] is preferred for
    ``prompts[i]``; ``provenance[i]`` (JSON-serialisable, e.g. rewards or the prompts sampled with) is stored
    on the line and ignored by the reader. Returns the number of pairs written."""
    if not len(prompts) == len(image_w) == len(image_l) == len(provenance):
        raise ValueError(f"{len(prompts)} prompts, {len(image_w)} preferred and {len(image_l)} dispreferred images, "
                         f"{len(provenance)} provenance entries: give one of each per pair")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    pairs_file = folder / PAIRS_FILE
    start = _count_rows(pairs_file)
    lines = []
    for i, prompt in enumerate(prompts):
        name = f"images/{start + i:08d}"
        for suffix, image in (("w", image_w[i]), ("l", image_l[i])):
            _to_pil(image).save(folder / f"{name}_{suffix}.png")
        entry = {"prompt": prompt, "image_w": f"{name}_w.png", "image_l": f"{name}_l.png"}
        lines.append(json.dumps(provenance[i] | entry))  # the reader's keys win over provenance
    # Images first, lines last: a crash in between leaves unreferenced files, never a line without its images.
    with pairs_file.open("a", encoding="utf-8") as out:
        out.writelines(line + "\n" for line in lines)
    return len(lines)


def _count_rows(pairs_file: Path) -> int:
    if not pairs_file.is_file():
        return 0
    with pairs_file.open(encoding="utf-8") as lines:
        return sum(1 for line in lines if line.strip())


def _to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> 8-bit RGB."""
    return Image.fromarray((image.detach().float().permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8"))
