import io
import json
import logging

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tailorpo.pairs import data as pair_data
from tailorpo.pairs.data import PairDataError, PairDataset, collate_pairs, export_pairs, image_to_tensor, read_pairs

RED, GREEN, BLUE, YELLOW = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)
CYAN, MAGENTA, WHITE, BLACK = (0, 255, 255), (255, 0, 255), (255, 255, 255), (0, 0, 0)


def solid(colour, size=(24, 24)) -> Image.Image:
    return Image.new("RGB", size, colour)


def encoded(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, quality=95) if fmt == "JPEG" else image.save(buffer, format=fmt)
    return buffer.getvalue()


def colour_of(image: Image.Image) -> tuple[int, int, int]:
    """Mean colour, rounded to the nearest of the fixture colours' 0/255 channels (JPEG is lossy)."""
    return tuple(255 if c > 127 else 0 for c in np.asarray(image, dtype=np.float64).mean(axis=(0, 1)))


# Pick-a-Pic rows: (caption, jpg_0, jpg_1, label_0). Each used row has its own colours, so the test can tell
# which image came out as the winner.
TRUNCATED = encoded(solid(WHITE, (64, 64)))[:200]
PICKAPIC_ROWS = [
    ("red over blue", encoded(solid(RED)), encoded(solid(BLUE)), 1.0),  # 0: winner is jpg_0
    ("yellow over green", encoded(solid(GREEN)), encoded(solid(YELLOW)), 0.0),  # 1: winner is jpg_1
    ("a tie", encoded(solid(CYAN)), b"junk, but a tie is never decoded", 0.5),  # 2: tie
    ("corrupt loser", encoded(solid(MAGENTA)), b"not a jpeg", 1.0),  # 3: bad, jpg_1 undecodable
    ("truncated", TRUNCATED, encoded(solid(BLACK)), 0.0),  # 4: bad, jpg_0 truncated
    ("no label", encoded(solid(WHITE)), encoded(solid(BLACK)), None),  # 5: bad, label_0 missing
    ("cyan over magenta", encoded(solid(CYAN)), encoded(solid(MAGENTA)), 1.0),  # 6: winner is jpg_0
]
EXPECTED = [
    (0, "red over blue", RED, BLUE),
    (1, "yellow over green", YELLOW, GREEN),
    (6, "cyan over magenta", CYAN, MAGENTA),
]


def write_pickapic(path, rows) -> None:
    captions, jpg_0, jpg_1, label_0 = zip(*rows, strict=True)
    table = pa.table(
        {
            "caption": list(captions),
            "jpg_0": pa.array(jpg_0, pa.binary()),
            "jpg_1": pa.array(jpg_1, pa.binary()),
            "label_0": pa.array(label_0, pa.float64()),
            "user_id": list(range(len(rows))),  # Pick-a-Pic has more columns; the reader ignores them
        }
    )
    pq.write_table(table, path)


@pytest.fixture
def pickapic_file(tmp_path):
    path = tmp_path / "pickapic.parquet"
    write_pickapic(path, PICKAPIC_ROWS)
    return path


def summary(reader):
    """(index, prompt, winner colour, loser colour) of every record, then the counts and bad row indices."""
    records = [(r.index, r.prompt, colour_of(r.image_w), colour_of(r.image_l)) for r in reader]
    stats = reader.stats
    return records, (stats.read, stats.used, stats.ties, stats.bad), [b.index for b in stats.bad_rows]


def test_parquet_winner_follows_label_0_ties_and_bad_rows_counted(pickapic_file, caplog):
    reader = read_pairs(pickapic_file)
    with caplog.at_level(logging.WARNING, logger="tailorpo.pairs.data"):
        records, counts, bad = summary(reader)
    assert records == EXPECTED
    assert counts == (7, 3, 1, 3)
    assert bad == [3, 4, 5]
    reasons = [b.reason for b in reader.stats.bad_rows]
    assert "jpg_1 cannot be decoded (not an image format" in reasons[0]
    assert "jpg_0 cannot be decoded" in reasons[1] and "truncated" in reasons[1].lower()
    assert "label_0=None" in reasons[2]
    assert reader.stats.bad_rows[0].where == "pickapic.parquet row 3"
    # every skipped row is logged with its index, and the pass ends with the counts
    assert "pickapic.parquet row 3 (row 3)" in caplog.text and "(row 5)" in caplog.text
    assert "7 rows read: 3 pairs used, 1 ties skipped, 3 bad rows skipped" in caplog.text


def test_a_second_pass_recounts(pickapic_file):
    reader = read_pairs(pickapic_file)
    first = summary(reader)
    assert summary(reader) == first


def test_parquet_shards_number_rows_across_files(tmp_path):
    write_pickapic(tmp_path / "train-00000.parquet", PICKAPIC_ROWS[:3])
    write_pickapic(tmp_path / "train-00001.parquet", PICKAPIC_ROWS[3:])
    reader = read_pairs(tmp_path)
    records, counts, bad = summary(reader)
    assert records == EXPECTED
    assert counts == (7, 3, 1, 3) and bad == [3, 4, 5]
    assert reader.stats.bad_rows[0].where == "train-00001.parquet row 0"


def test_on_error_raise_names_the_row_and_the_fix(pickapic_file):
    reader = read_pairs(pickapic_file, on_error="raise")
    seen = []
    with pytest.raises(PairDataError, match=r"pickapic.parquet row 3 \(row 3\): jpg_1 cannot be decoded") as info:
        for record in reader:
            seen.append(record.index)
    assert "on_error='skip'" in str(info.value) and "Fix or remove this row" in str(info.value)
    assert seen == [0, 1]
    assert (reader.stats.read, reader.stats.ties, reader.stats.bad) == (4, 1, 1)


def test_unknown_on_error_is_refused(pickapic_file):
    with pytest.raises(ValueError, match="on_error='ignore'"):
        read_pairs(pickapic_file, on_error="ignore")


def test_parquet_without_pickapic_columns_fails_before_reading(tmp_path):
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"caption": ["x"], "image": [b"y"], "label_0": [1.0]}), path)
    with pytest.raises(PairDataError, match=r"other.parquet: missing column\(s\) \['jpg_0', 'jpg_1'\]"):
        read_pairs(path)


def test_folder_without_pairs_or_parquet_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(PairDataError, match="expected a folder with pairs.jsonl"):
        read_pairs(tmp_path)


@pytest.fixture
def pair_folder(tmp_path):
    folder = tmp_path / "pairs"
    (folder / "images").mkdir(parents=True)
    solid(RED).save(folder / "images/red.png")
    solid(BLUE).save(folder / "images/blue.jpg", quality=95)
    solid(GREEN, (40, 20)).save(folder / "images/green.png")
    Image.new("I;16", (8, 8)).save(folder / "images/deep.png")  # 16-bit grey: RGB conversion would clip it
    lines = [
        json.dumps({"prompt": "red over blue", "image_w": "images/red.png", "image_l": "images/blue.jpg"}),
        "",  # blank lines are skipped, and row numbers still follow the file's lines
        json.dumps({"prompt": "lost", "image_w": "images/red.png", "image_l": "images/gone.png"}),
        json.dumps({"prompt": "deep", "image_w": "images/deep.png", "image_l": "images/red.png"}),
        '{"prompt": "broken json", ',
        json.dumps({"prompt": "no loser", "image_w": "images/red.png"}),
        json.dumps({"prompt": "green over red", "image_w": "images/green.png", "image_l": "images/red.png",
                    "reward_w": 2.0}),
    ]
    (folder / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_folder_reader_reports_missing_file_wrong_mode_and_bad_lines(pair_folder):
    reader = read_pairs(pair_folder)
    records, counts, bad = summary(reader)
    assert records == [(0, "red over blue", RED, BLUE), (6, "green over red", GREEN, RED)]
    assert counts == (6, 2, 0, 4)
    assert bad == [2, 3, 4, 5]
    reasons = [(b.where, b.reason) for b in reader.stats.bad_rows]
    assert reasons[0][0] == "pairs.jsonl line 3" and "image_l: missing file" in reasons[0][1]
    assert "gone.png" in reasons[0][1]
    assert "image_w has mode 'I;16'" in reasons[1][1] or "image_w has mode 'I'" in reasons[1][1]
    assert "invalid JSON" in reasons[2][1]
    assert "missing field(s) ['image_l']" in reasons[3][1]
    # the pairs.jsonl file itself names its folder too
    assert summary(read_pairs(pair_folder / "pairs.jsonl")) == (records, counts, bad)


def test_folder_missing_file_raises_with_the_line(pair_folder):
    with pytest.raises(PairDataError, match=r"pairs.jsonl line 3 \(row 2\): image_l: missing file"):
        list(read_pairs(pair_folder, on_error="raise"))


@pytest.mark.parametrize("streaming", [False, True])
def test_datasets_path_reads_what_the_parquet_reader_reads(pickapic_file, tmp_path, streaming):
    # "parquet" is not a local path, so it takes the hub-id branch: datasets.load_dataset(source, split=...)
    kwargs = {"data_files": str(pickapic_file)} | ({} if streaming else {"cache_dir": str(tmp_path / "hf")})
    reader = read_pairs("parquet", split="train", streaming=streaming, dataset_kwargs=kwargs)
    records, counts, bad = summary(reader)
    assert records == EXPECTED
    assert counts == (7, 3, 1, 3) and bad == [3, 4, 5]
    assert reader.stats.bad_rows[0].where == "train row 3"


def test_hub_id_is_loaded_with_split_and_streaming(pickapic_file, monkeypatch):
    calls = []
    local = datasets.load_dataset("parquet", data_files=str(pickapic_file), split="train", streaming=True)

    def fake_load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return local

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    records, _, _ = summary(read_pairs("yuvalkirstain/pickapic_v2", split="validation_unique", streaming=True))
    assert calls == [("yuvalkirstain/pickapic_v2", {"split": "validation_unique", "streaming": True})]
    assert records == EXPECTED


def test_hub_failure_names_the_local_formats(monkeypatch):
    def offline(name, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PairDataError, match=r"could not load dataset 'no/such-set'.*ConnectionError.*pairs.jsonl"):
        read_pairs("no/such-set")


def test_image_feature_columns_are_decoded_one_row_at_a_time():
    # A dataset with Image features would decode inside its own iterator and crash on a corrupt image;
    # the reader reads those columns undecoded so the corrupt one is a counted bad row.
    rows = {
        "caption": ["red over blue", "corrupt"],
        "jpg_0": [{"bytes": encoded(solid(RED), "PNG"), "path": None}, {"bytes": b"\x89PNG garbage", "path": None}],
        "jpg_1": [{"bytes": encoded(solid(BLUE), "PNG"), "path": None}, {"bytes": encoded(solid(RED)), "path": None}],
        "label_0": [1.0, 1.0],
    }
    features = datasets.Features(
        caption=datasets.Value("string"),
        jpg_0=datasets.Image(),
        jpg_1=datasets.Image(),
        label_0=datasets.Value("float64"),
    )
    reader = read_pairs(datasets.Dataset.from_dict(rows, features=features))
    records, counts, bad = summary(reader)
    assert records == [(0, "red over blue", RED, BLUE)]
    assert counts == (2, 1, 0, 1) and bad == [1]
    assert reader.stats.bad_rows[0].where == "row 1"


def test_dataset_dict_and_missing_columns_are_refused():
    dataset = datasets.Dataset.from_dict({"caption": ["x"], "label_0": [1.0]})
    with pytest.raises(PairDataError, match="pass one split"):
        read_pairs(datasets.DatasetDict(train=dataset))
    with pytest.raises(PairDataError, match=r"lacks column\(s\) \['jpg_0', 'jpg_1'\]"):
        read_pairs(dataset)


def test_image_to_tensor_resizes_the_short_side_and_center_crops():
    image = Image.new("RGB", (96, 32), RED)  # red | green | blue, the green band in the middle half
    image.paste(GREEN, (24, 0, 72, 32))
    image.paste(BLUE, (72, 0, 96, 32))
    tensor = image_to_tensor(image, 16)  # 96x32 -> 48x16 -> the middle 16 columns, all green
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    expected = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 16, 16)
    torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
    tall = image_to_tensor(image.rotate(90, expand=True), 16)  # the same along the other axis
    torch.testing.assert_close(tall, expected, rtol=0, atol=1e-6)


def test_pair_dataset_batches_tensors_in_minus_one_one(pickapic_file):
    loader = DataLoader(PairDataset(read_pairs(pickapic_file), 16), batch_size=2, collate_fn=collate_pairs)
    batches = list(loader)
    assert [len(b.prompts) for b in batches] == [2, 1]
    first = batches[0]
    assert first.prompts == ["red over blue", "yellow over green"]
    assert first.index.tolist() == [0, 1]
    assert first.image_w.shape == first.image_l.shape == (2, 3, 16, 16)
    assert first.image_w.min() >= -1 and first.image_w.max() <= 1
    # winner of row 0 is red, of row 1 yellow: channel means near +-1 (JPEG moves them by a few levels)
    means = first.image_w.mean(dim=(2, 3))
    torch.testing.assert_close(means, torch.tensor([[1.0, -1.0, -1.0], [1.0, 1.0, -1.0]]), rtol=0, atol=0.05)
    torch.testing.assert_close(first.image_l.mean(dim=(2, 3))[0], torch.tensor([-1.0, -1.0, 1.0]), rtol=0, atol=0.05)


def test_pair_dataset_refuses_worker_processes(pickapic_file, monkeypatch):
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())
    with pytest.raises(RuntimeError, match="num_workers=0"):
        next(iter(PairDataset(read_pairs(pickapic_file), 16)))


def solid_batch(colours, size=8) -> torch.Tensor:
    """(len(colours), 3, size, size) in [0, 1]."""
    return torch.tensor(colours, dtype=torch.float32).view(-1, 3, 1, 1).expand(-1, 3, size, size) / 255


def test_export_writes_the_higher_reward_image_as_winner_and_round_trips(tmp_path):
    folder = tmp_path / "online"
    prompts = ["a", "b", "c"]
    # rows i and 3 + i are the two samples of prompt i (d3po_rollout's order)
    images = solid_batch([RED, GREEN, CYAN, BLUE, YELLOW, MAGENTA])
    rewards = torch.tensor([2.0, 0.0, 1.5, 1.0, 3.0, 1.5])  # a: sample 0 wins, b: sample 1 wins, c: tie
    counts = export_pairs(folder, prompts, images, rewards)
    assert (counts.written, counts.ties) == (2, 1)
    counts = export_pairs(folder, ["d"], solid_batch([BLACK, WHITE]), torch.tensor([-1.0, 4.0]))  # appends
    assert (counts.written, counts.ties) == (1, 0)

    reader = read_pairs(folder)
    records = [(r.index, r.prompt, colour_of(r.image_w), colour_of(r.image_l)) for r in reader]
    assert records == [(0, "a", RED, BLUE), (1, "b", YELLOW, GREEN), (2, "d", WHITE, BLACK)]
    assert (reader.stats.read, reader.stats.used, reader.stats.bad) == (3, 3, 0)
    lines = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    assert [(line["reward_w"], line["reward_l"]) for line in lines] == [(2.0, 1.0), (3.0, 0.0), (4.0, -1.0)]
    assert len({line["image_w"] for line in lines} | {line["image_l"] for line in lines}) == 6  # nothing overwritten
    # PNG keeps the exported pixels exactly: the tensors read back are the images written, mapped to [-1, 1]
    dataset = list(PairDataset(read_pairs(folder), 8))
    torch.testing.assert_close(dataset[1]["image_w"], images[4] * 2 - 1, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "images, rewards, message",
    [
        (solid_batch([RED, BLUE, GREEN]), torch.zeros(3), r"expected \(2, 3, H, W\) for 1 prompts"),
        (solid_batch([RED, BLUE]), torch.zeros(3), r"expected \(2,\)"),
        (solid_batch([RED, BLUE]) * 2, torch.zeros(2), r"in \[0, 1\]"),
        (solid_batch([RED, BLUE]), torch.tensor([1.0, float("nan")]), "rewards must be finite"),
    ],
)
def test_export_refuses_bad_input(tmp_path, images, rewards, message):
    with pytest.raises(ValueError, match=message):
        export_pairs(tmp_path, ["a"], images, rewards)
    assert not (tmp_path / "pairs.jsonl").exists()


def test_corrupt_row_logging_is_capped(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(pair_data, "MAX_LOGGED_BAD_ROWS", 2)
    path = tmp_path / "bad.parquet"
    write_pickapic(path, [("x", b"junk", b"junk", 1.0)] * 5)
    reader = read_pairs(path)
    with caplog.at_level(logging.WARNING, logger="tailorpo.pairs.data"):
        assert list(reader) == []
    skipped = [r for r in caplog.records if r.getMessage().startswith("skipping")]
    assert [r.getMessage().split(" (row")[0] for r in skipped] == [f"skipping bad.parquet row {i}" for i in (0, 1)]
    assert "further bad rows" in caplog.text and "0 pairs used, 0 ties skipped, 5 bad rows skipped" in caplog.text
    assert reader.stats.bad == 5
