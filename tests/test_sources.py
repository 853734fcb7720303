"""Sources: class folders, CSV/JSON label files and parquet shards become deduplicated Samples."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from stage1core.sources import (
    DataError,
    Sample,
    SourceConfig,
    load_sources,
    parse_csv_labels,
    read_bytes,
    scan_source,
)


def png(i: int, size: int = 8) -> bytes:
    """A small valid PNG, different for every i."""
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (i % 256, (i // 256) % 256, 99)).save(buffer, "PNG")
    return buffer.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def hf_table(images: list[bytes | None], labels: list, paths: list[str] | None = None) -> pa.Table:
    """The Hugging Face natix-network-org/roadwork layout: image {bytes, path}, label."""
    paths = paths or [f"img_{i}.jpg" for i in range(len(images))]
    image = pa.array(
        [{"bytes": b, "path": p} for b, p in zip(images, paths, strict=True)],
        type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    return pa.table({"image": image, "label": pa.array(labels)})


# ----------------------------------------------------------------------------------------------- folders


def test_class_folders(tmp_path):
    root = tmp_path / "natix"
    pos = [write(root / "roadwork" / "a.jpg", png(1)), write(root / "roadwork" / "deep" / "b.PNG", png(2))]
    neg = [write(root / "no_roadwork" / "c.JPEG", png(3)), write(root / "no_roadwork" / "d.webp", png(4)),
           write(root / "no_roadwork" / "e.Bmp", png(5))]
    write(root / "roadwork" / ".hidden.jpg", png(6))  # hidden file
    write(root / "roadwork" / "._a.jpg", png(7))  # macOS AppleDouble companion
    write(root / "roadwork" / ".thumbs" / "t.jpg", png(8))  # hidden folder
    write(root / "roadwork" / "notes.txt", b"not an image")
    write(root / "misc" / "f.jpg", png(9))  # not a class folder

    samples = scan_source(SourceConfig(str(root)))
    by_locator = {s.locator: s for s in samples}
    assert sorted(by_locator) == sorted(str(p) for p in pos + neg)
    for p in pos + neg:
        s = by_locator[str(p)]
        assert s.sample_id == sha(p.read_bytes())
        assert s.label == (1 if p in pos else 0)
        assert (s.source, s.role) == ("natix", "all")
        assert Path(s.locator).is_absolute()


@pytest.mark.parametrize(("pos", "neg"), [("1", "0"), ("positive", "negative"), ("Roadwork", "No_Roadwork")])
def test_class_folder_aliases(tmp_path, pos, neg):
    write(tmp_path / pos / "a.jpg", png(1))
    write(tmp_path / neg / "b.jpg", png(2))
    labels = {Path(s.locator).name: s.label for s in scan_source(SourceConfig(str(tmp_path), kind="folder"))}
    assert labels == {"a.jpg": 1, "b.jpg": 0}


def test_folder_without_class_folders_is_an_error(tmp_path):
    write(tmp_path / "images" / "a.jpg", png(1))
    with pytest.raises(DataError, match="class folders"):
        scan_source(SourceConfig(str(tmp_path), kind="folder"))


def test_empty_image_file_in_folder_is_quarantined(tmp_path):
    write(tmp_path / "roadwork" / "a.jpg", png(1))
    write(tmp_path / "roadwork" / "empty.jpg", b"")
    scan = load_sources([SourceConfig(str(tmp_path))])
    assert len(scan.samples) == 1
    assert [q["reason"] for q in scan.quarantined] == ["unreadable: empty file (0 bytes)"]
    assert scan.quarantined[0]["row"] is None


def test_scanning_many_files_uses_the_thread_pool(tmp_path):
    for i in range(300):
        write(tmp_path / ("roadwork" if i % 3 else "no_roadwork") / f"{i:04d}.png", png(i))
    scan = load_sources([SourceConfig(str(tmp_path))])
    assert len(scan.samples) == 300 and scan.duplicates == 0
    assert sum(s.label for s in scan.samples) == 200


# ----------------------------------------------------------------------------------------------- CSV


def make_images(folder: Path, n: int, start: int = 0) -> list[Path]:
    return [write(folder / f"img{i}.jpg", png(i)) for i in range(start, start + n)]


@pytest.mark.parametrize("header", ["image_path,label", "filename,label", "path,label", "image,label",
                                    "Label,Image_Path", None])
def test_csv_with_and_without_header(tmp_path, header):
    images = make_images(tmp_path / "imgs", 4)
    labels = ["1", "0", "roadwork", "no_roadwork"]
    lines = [f"imgs/{p.name},{lab}" for p, lab in zip(images, labels, strict=True)]
    if header == "Label,Image_Path":
        lines = [f"{lab},imgs/{p.name}" for p, lab in zip(images, labels, strict=True)]
    text = "\n".join(([header] if header else []) + lines) + "\n"
    label_file = write(tmp_path / "labels.csv", text.encode())
    samples = scan_source(SourceConfig(str(label_file)))
    assert [(s.locator, s.label) for s in samples] == [(str(p), lab) for p, lab in zip(images, [1, 0, 1, 0],
                                                                                        strict=True)]
    assert samples[0].source == "labels.csv"


def test_csv_extra_columns_absolute_paths_bom_and_blank_lines(tmp_path):
    elsewhere = make_images(tmp_path / "far" / "away", 2)
    text = f"\ufeffid,image_path,label,note\n\n1,{elsewhere[0]},1,x\n2,{elsewhere[1]},0,\n"
    label_file = write(tmp_path / "sub" / "labels.csv", text.encode())
    samples = scan_source(SourceConfig(str(label_file)))
    assert [(s.locator, s.label) for s in samples] == [(str(elsewhere[0]), 1), (str(elsewhere[1]), 0)]


def test_csv_bad_label_names_file_and_row(tmp_path):
    make_images(tmp_path, 2)
    label_file = write(tmp_path / "labels.csv", b"image_path,label\nimg0.jpg,1\nimg1.jpg,maybe\n")
    with pytest.raises(DataError, match=r"labels\.csv, row 3: label 'maybe'"):
        scan_source(SourceConfig(str(label_file)))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "no rows"),
        ("image_path,label\n", "no data rows"),
        ("image_path,label\na.jpg,1,extra\n", "row 2: 3 fields"),
        ("a.jpg,1\nb.jpg\n", "row 2: 1 fields"),
        ("file,klass\na.jpg,1\n", "row 1: .* neither a header"),
        ("image_path,target\na.jpg,1\n", "row 1: header"),
        ("a.jpg,1,2\n", "row 1: header"),
        ("image_path,label\n,1\n", "row 2: empty"),
        ("a.jpg,1\nb.jpg,2\n", "row 2: label '2'"),
        ("a.jpg,2\n", "row 1: .* neither a header"),
    ],
)
def test_malformed_csv_is_a_data_error(tmp_path, text, match):
    label_file = write(tmp_path / "labels.csv", text.encode())
    with pytest.raises(DataError, match=match):
        scan_source(SourceConfig(str(label_file)))


def test_non_utf8_csv_is_a_data_error(tmp_path):
    label_file = write(tmp_path / "labels.csv", b"image_path,label\n\xff\xfe\xfa.jpg,1\n")
    with pytest.raises(DataError, match="UTF-8"):
        scan_source(SourceConfig(str(label_file)))


def test_missing_image_files_are_quarantined_not_fatal(tmp_path):
    make_images(tmp_path, 3)
    (tmp_path / "gone").mkdir()
    label_file = write(tmp_path / "labels.csv",
                       b"image_path,label\nimg0.jpg,1\nmissing.jpg,0\nimg1.jpg,0\ngone,1\nimg2.jpg,1\n")
    scan = load_sources([SourceConfig(str(label_file), name="natix")])
    assert len(scan.samples) == 3
    assert scan.quarantined == [
        {"locator": str(tmp_path / "missing.jpg"), "source": "natix", "row": 3, "reason": "missing file"},
        {"locator": str(tmp_path / "gone"), "source": "natix", "row": 5,
         "reason": "is a directory, not an image file"},
    ]
    assert scan.quarantined_fraction == pytest.approx(2 / 5)
    assert len(scan_source(SourceConfig(str(label_file)))) == 3


# ----------------------------------------------------------------------------------------------- JSON


def test_json_list_and_mapping_forms(tmp_path):
    images = make_images(tmp_path / "imgs", 3)
    entries = [{"filename": "imgs/img0.jpg", "label": 1}, {"image_path": "imgs/img1.jpg", "label": "0"},
               {"path": str(images[2]), "label": "roadwork", "extra": "ignored"}]
    listed = write(tmp_path / "labels.json", json.dumps(entries).encode())
    mapped = write(tmp_path / "map.json", json.dumps({"imgs/img0.jpg": 1, "imgs/img1.jpg": "no_roadwork",
                                                      "imgs/img2.jpg": "1"}).encode())
    for label_file in (listed, mapped):
        samples = scan_source(SourceConfig(str(label_file)))
        assert [(s.locator, s.label) for s in samples] == [(str(images[0]), 1), (str(images[1]), 0),
                                                           (str(images[2]), 1)]


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"[{\"filename\": \"a.jpg\", ", "not valid JSON"),
        (b"[]", "no entries"),
        (b"{}", "no entries"),
        (b"\"a.jpg\"", "expected a list"),
        (b"[{\"filename\": \"a.jpg\", \"label\": 1}, {\"file\": \"b.jpg\", \"label\": 1}]", "entry 1: needs"),
        (b"[{\"filename\": \"a.jpg\", \"label\": true}]", "entry 0: label True"),
        (b"[{\"filename\": \"a.jpg\", \"label\": 1.0}]", "entry 0: label 1.0"),
        (b"[{\"filename\": 7, \"label\": 1}]", "entry 0: image path 7"),
        (b"[[\"a.jpg\", 1]]", "entry 0: expected an object"),
    ],
)
def test_malformed_json_is_a_data_error(tmp_path, payload, match):
    label_file = write(tmp_path / "labels.json", payload)
    with pytest.raises(DataError, match=match):
        scan_source(SourceConfig(str(label_file)))


# ----------------------------------------------------------------------------------------------- parquet


def test_parquet_shards_and_read_bytes(tmp_path):
    folder = tmp_path / "roadwork_hf" / "data"
    first = [png(i) for i in range(5)]
    second = [png(i) for i in range(5, 8)]
    folder.mkdir(parents=True)
    # written out of order, with small row groups so read_bytes has to pick the right one
    pq.write_table(hf_table(second, [0, 1, 0]), folder / "train-00001.parquet", row_group_size=2)
    pq.write_table(hf_table(first, [1, 0, 1, 1, 0]), folder / "train-00000.parquet", row_group_size=2)
    write(tmp_path / "roadwork_hf" / "README.md", b"# dataset card")

    samples = scan_source(SourceConfig(str(tmp_path / "roadwork_hf")))
    assert [s.locator for s in samples] == (
        [f"{folder / 'train-00000.parquet'}#row={i}" for i in range(5)]
        + [f"{folder / 'train-00001.parquet'}#row={i}" for i in range(3)]
    )
    assert [s.label for s in samples] == [1, 0, 1, 1, 0, 0, 1, 0]
    assert [s.sample_id for s in samples] == [sha(b) for b in first + second]
    for s, data in zip(samples, first + second, strict=True):
        assert read_bytes(s.locator) == data
    assert read_bytes(samples[2].locator) == first[2]  # cached row group, again

    one = scan_source(SourceConfig(str(folder / "train-00001.parquet")))
    assert [s.label for s in one] == [0, 1, 0] and one[0].source == "train-00001.parquet"


def _read_in_worker(locator: str) -> str:
    return sha(read_bytes(locator))


def test_read_bytes_in_forked_workers(tmp_path):
    images = [png(i) for i in range(6)]
    shard = tmp_path / "s.parquet"
    pq.write_table(hf_table(images, [0, 1] * 3), shard, row_group_size=2)
    samples = scan_source(SourceConfig(str(shard)))
    read_bytes(samples[0].locator)  # the parent opens and caches the shard first, as a DataLoader would
    with multiprocessing.get_context("fork").Pool(2) as pool:
        digests = pool.map(_read_in_worker, [s.locator for s in samples])
    assert digests == [s.sample_id for s in samples]


def test_parquet_labels_may_be_strings_and_empty_rows_are_quarantined(tmp_path):
    shard = tmp_path / "s.parquet"
    pq.write_table(hf_table([png(1), None, b"", png(2)], ["roadwork", "1", "0", "no_roadwork"]), shard)
    scan = load_sources([SourceConfig(str(shard), name="hf")])
    assert [(s.label, s.locator) for s in sorted(scan.samples, key=lambda s: s.locator)] == [
        (1, f"{shard}#row=0"), (0, f"{shard}#row=3")]
    assert [(q["row"], q["reason"]) for q in scan.quarantined] == [(1, "no image bytes in this row"),
                                                                    (2, "no image bytes in this row")]


def test_parquet_with_plain_binary_image_column(tmp_path):
    shard = tmp_path / "s.parquet"
    pq.write_table(pa.table({"image": pa.array([png(1)], pa.binary()), "label": [1]}), shard)
    [sample] = scan_source(SourceConfig(str(shard)))
    assert read_bytes(sample.locator) == png(1)


@pytest.mark.parametrize(
    ("table", "match"),
    [
        (pa.table({"image": pa.array([png(1)], pa.binary())}), r"missing column\(s\) \['label'\]"),
        (pa.table({"img": pa.array([png(1)], pa.binary()), "label": [1]}), r"column\(s\) \['image'\]"),
        (pa.table({"image": pa.array([{"path": "a"}]), "label": [1]}), "without a `bytes` field"),
        (pa.table({"image": pa.array([3]), "label": [1]}), "has type int64"),
        (pa.table({"image": pa.array([png(1), png(2)], pa.binary()), "label": [1, 7]}), "row 1: label 7"),
        (pa.table({"image": pa.array([png(1)], pa.binary()), "label": pa.array([None], pa.int64())}),
         "row 0: label None"),
    ],
)
def test_bad_parquet_is_a_data_error(tmp_path, table, match):
    shard = tmp_path / "bad.parquet"
    pq.write_table(table, shard)
    with pytest.raises(DataError, match=match):
        scan_source(SourceConfig(str(shard)))


def test_corrupt_parquet_is_a_data_error(tmp_path):
    shard = write(tmp_path / "bad.parquet", b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable parquet file"):
        scan_source(SourceConfig(str(shard)))


# ----------------------------------------------------------------------------------------------- merging


def test_duplicates_collapse_and_role_all_wins(tmp_path):
    natix = tmp_path / "natix"
    extra = tmp_path / "extra"
    write(natix / "roadwork" / "a.jpg", png(1))
    write(natix / "roadwork" / "a_copy.jpg", png(1))  # duplicate inside one source
    write(natix / "no_roadwork" / "b.jpg", png(2))
    write(extra / "roadwork" / "same_as_a.jpg", png(1))
    write(extra / "roadwork" / "only_extra.jpg", png(3))

    for order in (1, -1):
        configs = [SourceConfig(str(extra), role="train_only"), SourceConfig(str(natix))][::order]
        scan = load_sources(configs)
        assert scan.duplicates == 2
        assert [s.sample_id for s in scan.samples] == sorted(sha(png(i)) for i in (1, 2, 3))
        by_id = {s.sample_id: s for s in scan.samples}
        merged = by_id[sha(png(1))]
        assert (merged.role, merged.source) == ("all", "natix")
        assert merged.locator in {str(natix / "roadwork" / "a.jpg"), str(natix / "roadwork" / "a_copy.jpg")}
        assert by_id[sha(png(3))].role == "train_only"
    # order of sources does not change the data fingerprint
    assert load_sources(configs).fingerprint() == load_sources(configs[::-1]).fingerprint()


def test_conflicting_labels_name_both_locations(tmp_path):
    first = write(tmp_path / "a" / "roadwork" / "x.jpg", png(1))
    second = write(tmp_path / "b" / "no_roadwork" / "y.jpg", png(1))
    with pytest.raises(DataError) as info:
        load_sources([SourceConfig(str(tmp_path / "a")), SourceConfig(str(tmp_path / "b"))])
    assert str(first) in str(info.value) and str(second) in str(info.value)


def test_fingerprint_follows_content_not_location(tmp_path):
    src = tmp_path / "one"
    for i in range(4):
        write(src / ("roadwork" if i % 2 else "no_roadwork") / f"{i}.jpg", png(i))
    shutil.copytree(src, tmp_path / "two")
    fp = load_sources([SourceConfig(str(src))]).fingerprint()
    assert fp == load_sources([SourceConfig(str(tmp_path / "two"), name="other")]).fingerprint()
    assert fp != load_sources([SourceConfig(str(src), role="train_only")]).fingerprint()
    os.rename(src / "roadwork" / "1.jpg", src / "no_roadwork" / "1.jpg")  # relabel one image
    assert fp != load_sources([SourceConfig(str(src))]).fingerprint()


# ----------------------------------------------------------------------------------------------- config


def test_config_validation_and_auto_kind(tmp_path):
    with pytest.raises(DataError, match="role"):
        SourceConfig("x", role="eval_only")
    with pytest.raises(DataError, match="kind"):
        SourceConfig("x", kind="tfrecord")
    assert SourceConfig(str(tmp_path / "data" / "natix") + "/").name == "natix"
    with pytest.raises(DataError, match="does not exist"):
        scan_source(SourceConfig(str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match="suffix"):
        scan_source(SourceConfig(str(write(tmp_path / "labels.txt", b"a.jpg,1\n"))))
    write(tmp_path / "plain" / "a.jpg", png(1))
    with pytest.raises(DataError, match="neither class folders"):
        scan_source(SourceConfig(str(tmp_path / "plain")))
    write(tmp_path / "d" / "roadwork" / "a.jpg", png(1))
    with pytest.raises(DataError, match="used twice"):
        load_sources([SourceConfig(str(tmp_path / "d")), SourceConfig(str(tmp_path / "d"))])
    with pytest.raises(DataError, match="no sources"):
        load_sources([])


def test_read_bytes_errors_say_what_to_do(tmp_path):
    with pytest.raises(DataError, match="rescan"):
        read_bytes(str(tmp_path / "gone.jpg"))
    shard = tmp_path / "s.parquet"
    pq.write_table(hf_table([png(1)], [1]), shard)
    with pytest.raises(DataError, match="row 5 out of range"):
        read_bytes(f"{shard}#row=5")


def test_sample_is_frozen():
    sample = Sample("a" * 64, 1, "s", "all", "/x.jpg")
    with pytest.raises(AttributeError):
        sample.label = 0  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------- fuzz

cells = st.one_of(
    st.sampled_from(["image_path", "filename", "path", "image", "label", "Label", "1", "0", "roadwork",
                     "no_roadwork", "a.jpg", "", " ", "2", "x,y", '"', "\x00", "\n", "img/ü.jpg"]),
    st.text(max_size=12),
)


good_paths = st.sampled_from(["a.jpg", "img/b.png", "c d.jpg", "x,y.jpg", "/abs/e.jpg", "ü.jpg"])
good_labels = st.sampled_from(["0", "1", "roadwork", "no_roadwork", " 1 ", "ROADWORK"])
headers = st.one_of(st.none(), st.sampled_from([["image_path", "label"], ["filename", "label"],
                                                ["label", "path"]]), st.lists(cells, max_size=3))
good_rows = st.lists(st.tuples(good_paths, good_labels).map(list), min_size=1, max_size=6)
noisy_rows = st.lists(st.one_of(st.tuples(good_paths, good_labels).map(list), st.lists(cells, max_size=4)),
                      max_size=6)
# well-formed files (so parses also succeed), files with some bad rows, and random cells
csv_rows = st.one_of(
    st.tuples(headers, st.one_of(good_rows, noisy_rows)).map(lambda hr: ([hr[0]] if hr[0] else []) + hr[1]),
    st.lists(st.lists(cells, max_size=4), max_size=6),
)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(rows=csv_rows)
def test_csv_parser_only_ever_raises_data_error(tmp_path, rows):
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    text = buffer.getvalue()
    label_file = tmp_path / "fuzz.csv"
    label_file.write_text(text, encoding="utf-8")
    try:
        parsed = parse_csv_labels(text, origin="fuzz.csv")
    except DataError:
        with pytest.raises(DataError):  # the file path agrees with the parser
            load_sources([SourceConfig(str(label_file))])
        return
    assert parsed and all(r.label in (0, 1) and r.path for r in parsed)
    # images are missing (or happen to exist): quarantined, never a crash
    scan = load_sources([SourceConfig(str(label_file))])
    assert len(scan.samples) + scan.duplicates + len(scan.quarantined) == len(parsed)


# ----------------------------------------------------------------------------------------------- groups


def group_of(samples) -> dict[str, str]:
    return {Path(s.locator).name: s.group for s in samples}


@pytest.mark.parametrize(("header", "config"), [("image_path,label,group", ""), ("image_path,Drive,label", "drive"),
                                                ("image_path,label,session", "session")])
def test_csv_group_column(tmp_path, header, config):
    make_images(tmp_path, 4)
    cells = [("img0.jpg", "1", "d1"), ("img1.jpg", "0", " d1 "), ("img2.jpg", "1", "7"), ("img3.jpg", "0", "")]
    order = header.lower().split(",")
    lines = [",".join({"image_path": p, "label": lab}.get(col, g) for col in order) for p, lab, g in cells]
    label_file = write(tmp_path / "labels.csv", "\n".join([header, *lines]).encode())
    samples = scan_source(SourceConfig(str(label_file), name="natix", group_column=config))
    assert group_of(samples) == {"img0.jpg": "natix:d1", "img1.jpg": "natix:d1", "img2.jpg": "natix:7",
                                 "img3.jpg": ""}
    assert [s.label for s in samples] == [1, 0, 1, 0]


def test_csv_without_a_group_column_has_no_groups_and_keeps_its_fingerprint(tmp_path):
    make_images(tmp_path, 2)
    label_file = write(tmp_path / "labels.csv", b"image_path,label\nimg0.jpg,1\nimg1.jpg,0\n")
    scan = load_sources([SourceConfig(str(label_file))])
    assert [s.group for s in scan.samples] == ["", ""]
    # the data fingerprint of ungrouped data is what it was before groups existed
    assert scan.fingerprint() == hashlib.sha256(json.dumps(
        [[[s.sample_id, s.label, s.role] for s in scan.samples]], separators=(",", ":")).encode()).hexdigest()
    grouped = write(tmp_path / "grouped.csv", b"image_path,label,group\nimg0.jpg,1,a\nimg1.jpg,0,a\n")
    assert load_sources([SourceConfig(str(grouped))]).fingerprint() != scan.fingerprint()


@pytest.mark.parametrize(
    ("text", "column", "match"),
    [
        ("image_path,label\nimg0.jpg,1\n", "drive", r"labels\.csv, row 1: no group column 'drive' in the header"),
        ("img0.jpg,1\n", "drive", r"labels\.csv: group column 'drive' is configured but the file has no header"),
    ],
)
def test_missing_csv_group_column_names_file_and_column(tmp_path, text, column, match):
    make_images(tmp_path, 1)
    label_file = write(tmp_path / "labels.csv", text.encode())
    with pytest.raises(DataError, match=match):
        scan_source(SourceConfig(str(label_file), group_column=column))


def test_json_group_key(tmp_path):
    make_images(tmp_path, 4)
    entries = [{"filename": "img0.jpg", "label": 1, "drive": "a"}, {"filename": "img1.jpg", "label": 0, "drive": 3},
               {"filename": "img2.jpg", "label": 1, "drive": None}, {"filename": "img3.jpg", "label": 0}]
    label_file = write(tmp_path / "labels.json", json.dumps(entries).encode())
    samples = scan_source(SourceConfig(str(label_file), name="j", group_column="drive"))
    assert group_of(samples) == {"img0.jpg": "j:a", "img1.jpg": "j:3", "img2.jpg": "", "img3.jpg": ""}
    default = write(tmp_path / "default.json",
                    json.dumps([{"filename": "img0.jpg", "label": 1, "group": "g"}]).encode())
    assert scan_source(SourceConfig(str(default), name="k"))[0].group == "k:g"


@pytest.mark.parametrize(
    ("payload", "column", "match"),
    [
        ([{"filename": "img0.jpg", "label": 1}], "drive", r"labels\.json: no entry has the group key 'drive'"),
        ({"img0.jpg": 1}, "drive", r"labels\.json: a \{filename: label\} object has no room for the group key"),
        ([{"filename": "img0.jpg", "label": 1, "group": [1]}], "", r"labels\.json, entry 0: group \[1\] is not"),
        ([{"filename": "img0.jpg", "label": 1, "group": True}], "", "entry 0: group True is not"),
    ],
)
def test_bad_json_group_is_a_data_error(tmp_path, payload, column, match):
    make_images(tmp_path, 1)
    label_file = write(tmp_path / "labels.json", json.dumps(payload).encode())
    with pytest.raises(DataError, match=match):
        scan_source(SourceConfig(str(label_file), group_column=column))


def test_parquet_group_column(tmp_path):
    shard = tmp_path / "s.parquet"
    table = hf_table([png(i) for i in range(4)], [1, 0, 1, 0]).append_column(
        "drive", pa.array(["d1", None, "d1", "d2"]))
    pq.write_table(table, shard, row_group_size=2)
    samples = scan_source(SourceConfig(str(shard), name="hf", group_column="drive"))
    assert [s.group for s in samples] == ["hf:d1", "", "hf:d1", "hf:d2"]
    ints = tmp_path / "ints.parquet"
    pq.write_table(hf_table([png(9)], [1]).append_column("group", pa.array([42])), ints)
    assert scan_source(SourceConfig(str(ints), name="hf"))[0].group == "hf:42"
    with pytest.raises(DataError, match=r"s\.parquet: no group column 'session'; has \['image', 'label', 'drive'\]"):
        scan_source(SourceConfig(str(shard), group_column="session"))


def test_class_folders_have_no_group_column(tmp_path):
    write(tmp_path / "roadwork" / "a.jpg", png(1))
    assert scan_source(SourceConfig(str(tmp_path)))[0].group == ""
    with pytest.raises(DataError, match="class folders carry no group column, but group_column='drive'"):
        scan_source(SourceConfig(str(tmp_path), group_column="drive"))
    with pytest.raises(DataError, match="group_column must be"):
        SourceConfig(str(tmp_path), group_column=3)  # type: ignore[arg-type]


def test_groups_are_namespaced_by_source_and_follow_duplicates(tmp_path):
    make_images(tmp_path / "a", 3)
    make_images(tmp_path / "b", 3, start=2)  # img2.jpg has the same bytes in both folders
    write(tmp_path / "b" / "img9.jpg", png(9))
    first = write(tmp_path / "a" / "labels.csv", b"image_path,label,group\nimg0.jpg,1,d1\nimg1.jpg,0,d1\nimg2.jpg,1,\n")
    second = write(tmp_path / "b" / "labels.csv",
                   b"image_path,label,group\nimg2.jpg,1,d1\nimg3.jpg,0,d1\nimg4.jpg,1,d2\nimg9.jpg,1,d2\n")
    scan = load_sources([SourceConfig(str(first), name="a"), SourceConfig(str(second), name="b")])
    by_id = {s.sample_id: s for s in scan.samples}
    # drive d1 of source a is not drive d1 of source b
    assert by_id[sha(png(0))].group == "a:d1" and by_id[sha(png(3))].group == "b:d1"
    # the shared image had no group in a (kept copy): it takes b's
    assert by_id[sha(png(2))].group == "b:d1" and scan.links == []

    # an image in two groups links them: a:d1's image also appears as b:d2
    relabelled = write(tmp_path / "b" / "labels2.csv", b"image_path,label,group\nimg2.jpg,1,d2\nimg4.jpg,1,d2\n")
    first2 = write(tmp_path / "a" / "labels2.csv", b"image_path,label,group\nimg1.jpg,0,d1\nimg2.jpg,1,d1\n")
    scan = load_sources([SourceConfig(str(first2), name="a"), SourceConfig(str(relabelled), name="b")])
    by_id = {s.sample_id: s for s in scan.samples}
    assert by_id[sha(png(2))].group == "a:d1"
    assert scan.links == [(sha(png(2)), sha(png(4)))]


def test_samples_carry_their_label_file_row_through_the_split_manifest(tmp_path):
    """The row a quarantine report names comes from the scan (CSV line, JSON index, parquet row), carried
    by the Sample and the split manifest: nothing parses a label file again to find it."""
    from stage1core.splits import SplitConfig, read_split_manifest, write_split_manifest

    images = make_images(tmp_path / "imgs", 3)
    csv_file = write(tmp_path / "labels.csv", b"image_path,label\n"
                     + "\n\n".join(f"imgs/{p.name},{i % 2}" for i, p in enumerate(images)).encode())
    by_locator = {s.locator: s.row for s in scan_source(SourceConfig(str(csv_file)))}
    assert by_locator == {str(images[0]): 2, str(images[1]): 4, str(images[2]): 6}  # blank lines counted
    json_file = write(tmp_path / "labels.json", json.dumps(
        [{"image_path": f"imgs/{p.name}", "label": 1} for p in images[::-1]]).encode())
    assert {s.locator: s.row for s in scan_source(SourceConfig(str(json_file)))} == {
        str(images[2]): 0, str(images[1]): 1, str(images[0]): 2}
    shard = tmp_path / "hf" / "train-00000.parquet"
    shard.parent.mkdir()
    pq.write_table(hf_table([png(i) for i in range(10, 13)], [1, 0, 1]), shard)
    assert [s.row for s in scan_source(SourceConfig(str(shard)))] == [0, 1, 2]
    folders = tmp_path / "folders"
    write(folders / "roadwork" / "a.jpg", png(20))
    write(folders / "no_roadwork" / "b.jpg", png(21))
    assert [s.row for s in scan_source(SourceConfig(str(folders)))] == [None, None]

    samples = scan_source(SourceConfig(str(csv_file)))
    manifest = tmp_path / "split.json"
    write_split_manifest(manifest, {"train": samples}, SplitConfig(), data_fingerprint="d")
    _, parts, _ = read_split_manifest(manifest)
    assert sorted(parts["train"], key=lambda s: s.locator) == sorted(samples, key=lambda s: s.locator)
