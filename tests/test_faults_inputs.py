"""Bad inputs: odd and broken image files, malformed label files (CSV, JSON, parquet), fuzzed label
parsers, and conflicting labels given to the `stage1` command. docs/reliability.md maps each fault to its
test."""

from __future__ import annotations

import csv
import io
import json
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from stage1core.images import ImageDecodeError, decode_image
from stage1core.sources import (
    DataError,
    SourceConfig,
    load_sources,
    parse_csv_labels,
    parse_json_labels,
)
from tests.faults import (
    cli_env,
    encode,
    exif_rotated,
    json_values,
    photo,
    png_claiming,
    prefect_db,
    query,
    run_stage1,
    text,
    write,
)

# ----------------------------------------------------------------------------------------------- bad images

GOOD_INPUTS = {
    # name: (bytes, expected size after decoding)
    "png_rgba_alpha": (lambda: encode(Image.new("RGBA", (9, 7), (255, 0, 0, 0)), "PNG"), (9, 7)),
    "palette": (lambda: encode(photo(20, 10).convert("P", palette=Image.Palette.ADAPTIVE), "PNG"), (20, 10)),
    "png_16bit": (lambda: encode(Image.fromarray(np.full((6, 5), 65535, np.uint16)), "PNG"), (5, 6)),
    "grayscale": (lambda: encode(photo().convert("L"), "JPEG"), (48, 32)),
    "cmyk_jpeg": (lambda: encode(photo().convert("CMYK"), "JPEG"), (48, 32)),
    "exif_rotated": (lambda: exif_rotated(6), (32, 48)),  # orientation 6: stored landscape, shown portrait
    "one_pixel": (lambda: encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), (1, 1)),
}

BAD_INPUTS = {
    # name: (bytes, what the error says)
    "zero_bytes": (lambda: b"", "empty"),
    "truncated_jpeg": (lambda: (lambda b: b[: len(b) // 2])(encode(photo(64, 64), "JPEG")), "truncated"),
    "not_an_image_named_jpg": (lambda: b"<html>a web page saved as .jpg</html>", "not an image"),
    "bomb_20000x20000": (lambda: png_claiming(20000, 20000), "too large"),
}


@pytest.mark.parametrize("name", sorted(GOOD_INPUTS))
def test_odd_but_valid_images_decode_to_8bit_rgb(name, tmp_path):
    make, size = GOOD_INPUTS[name]
    path = tmp_path / f"{name}.jpg"  # the suffix lies for some; decoding follows the bytes
    path.write_bytes(make())
    image = decode_image(path)
    assert image.mode == "RGB" and image.size == size
    if name == "png_rgba_alpha":
        assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent pixels composited on white
    if name == "png_16bit":
        assert image.getpixel((0, 0)) == (255, 255, 255)  # scaled from 65535, not clipped garbage


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_images_raise_image_decode_error(name, tmp_path):
    make, match = BAD_INPUTS[name]
    path = tmp_path / f"{name}.jpg"
    path.write_bytes(make())
    started = time.process_time()
    with pytest.raises(ImageDecodeError, match=match):
        decode_image(path)
    # the bomb guard reads the header only; decoding 400 MP would cost CPU seconds. CPU time of this
    # process, not wall time: other processes on a loaded machine do not count against it
    assert time.process_time() - started < 2.0


# ----------------------------------------------------------------------------------------------- label files


def test_duplicate_images_with_conflicting_labels_name_both_files(tmp_path):
    data = encode(photo(seed=1), "PNG")
    a = write(tmp_path / "natix" / "roadwork" / "a.png", data)
    b = write(tmp_path / "natix" / "no_roadwork" / "b.png", data)
    with pytest.raises(DataError) as err:
        load_sources([SourceConfig(str(tmp_path / "natix"))])
    assert str(a) in str(err.value) and str(b) in str(err.value) and "label 1" in str(err.value)


def test_missing_files_in_a_label_file_are_quarantined_with_their_row(tmp_path):
    write(tmp_path / "img" / "ok.png", encode(photo(seed=2), "PNG"))
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("image_path,label\nimg/ok.png,1\nimg/gone.png,0\n")
    scan = load_sources([SourceConfig(str(csv_file))])
    assert len(scan.samples) == 1
    assert scan.quarantined == [{"locator": str(tmp_path / "img" / "gone.png"), "source": "labels.csv", "row": 3,
                                 "reason": "missing file"}]
    assert scan.quarantined_fraction == pytest.approx(0.5)


@pytest.mark.parametrize("label", ["2", "-1", "yes", "1.0", "", "true"])
def test_csv_labels_other_than_0_1_are_refused_naming_file_and_row(tmp_path, label):
    with pytest.raises(DataError, match=r"labels\.csv, row 3: label"):
        parse_csv_labels(f"image_path,label\na.jpg,1\nb.jpg,{label}\n", origin=str(tmp_path / "labels.csv"))


@pytest.mark.parametrize("label", [2, -1, 1.0, True, None, "yes", [1]])
def test_json_labels_other_than_0_1_are_refused_naming_the_entry(label):
    text = json.dumps([{"filename": "a.jpg", "label": 0}, {"filename": "b.jpg", "label": label}])
    with pytest.raises(DataError, match=r"labels\.json, entry 1: label"):
        parse_json_labels(text, origin="labels.json")


@pytest.mark.parametrize(("text", "match"), [
    ("image_path,label\na.jpg,1,extra\n", "row 2: 3 fields"),
    ('image_path,label\n"a.jpg,1\n', "row 2|fields|readable"),
    ("", "no rows"),
    ("image_path,label\n", "no data rows"),
    ("foo,bar\na.jpg,1\n", "row 1"),
])
def test_malformed_csv_is_a_data_error(text, match):
    with pytest.raises(DataError, match=match):
        parse_csv_labels(text, origin="labels.csv")


@pytest.mark.parametrize(("text", "match"), [
    ("[{\"filename\": \"a.jpg\", \"label\": 1}", "not valid JSON"),
    ("[{\"file\": \"a.jpg\", \"label\": 1}]", "entry 0: needs a `filename`"),
    ("[\"a.jpg\"]", "entry 0: expected an object"),
    ("42", "expected a list"),
    ("[]", "no entries"),
])
def test_malformed_json_is_a_data_error(text, match):
    with pytest.raises(DataError, match=match):
        parse_json_labels(text, origin="labels.json")


def test_parquet_shard_missing_a_column_is_a_data_error_naming_the_shard(tmp_path):
    shard = tmp_path / "shards" / "train-00000.parquet"
    shard.parent.mkdir()
    pq.write_table(pa.table({"image": pa.array([b"x"], pa.binary())}), shard)
    with pytest.raises(DataError, match=r"train-00000\.parquet: missing column\(s\) \['label'\]"):
        load_sources([SourceConfig(str(tmp_path / "shards"))])


# ----------------------------------------------------------------------------------------------- fuzzing


entries = st.lists(st.fixed_dictionaries(
    {"filename": st.text(max_size=12) | st.integers(), "label": st.sampled_from([0, 1, "0", "1", "roadwork", 2, None])}
), max_size=5)


@settings(max_examples=150, deadline=None)
@given(doc=json_values | entries)
def test_json_label_parser_only_ever_raises_data_error(doc):
    try:
        rows = parse_json_labels(json.dumps(doc), origin="labels.json")
    except DataError:
        return
    assert rows and all(r.label in (0, 1) and r.path == r.path.strip() and r.path for r in rows)


@pytest.mark.parametrize("parse", [parse_json_labels, parse_csv_labels], ids=["json", "csv"])
@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=300))
def test_label_parsers_on_arbitrary_text(parse, text):
    try:
        parse(text, origin="labels")
    except DataError:
        pass


path_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=15).filter(
    lambda p: p.strip() == p and p.strip())


@settings(max_examples=150, deadline=None)
@given(rows=st.lists(st.tuples(path_text, st.sampled_from([0, 1])), min_size=1, max_size=8))
def test_csv_written_by_csv_module_parses_back_exactly(rows):
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["image_path", "label"])
    writer.writerows(rows)
    parsed = parse_csv_labels(buf.getvalue(), origin="labels.csv")
    assert [(r.path, r.label) for r in parsed] == rows


@pytest.mark.slow
def test_conflicting_labels_are_all_reported_before_the_run_stops(tmp_path, tiny_demo):
    images = sorted((tiny_demo / "roadwork").glob("*.jpg"))[:3]
    rows = ["image_path,label"] + [f"{p},1" for p in sorted(tiny_demo.rglob("*.jpg"))]
    rows += [f"{images[0]},0", f"{images[1]},0", f"{tmp_path / 'gone.jpg'},1"]  # two conflicts, one missing file
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    home = tmp_path / "home"
    proc = run_stage1(["train", "--source", str(labels)], cli_env(home), tmp_path)
    out, err = text(proc)
    assert proc.returncode == 2, out[-3000:] + err[-3000:]
    assert "Traceback" not in out + err
    (line,) = [x for x in err.splitlines() if x.startswith("stage1:")]
    assert "stage1: error: 2 label conflict(s), every one listed in " in line and str(images[0]) in line
    (report,) = (home / "reports").glob("quarantine-*.json")
    assert str(report) in line
    entries = json.loads(report.read_text())["entries"]
    conflicts = [e for e in entries if e["stage"] == "conflict"]
    assert {e["locator"] for e in conflicts} == {str(images[0]), str(images[1])}
    assert all(e["row"] and "label 0 here, label 1 at" in e["reason"] for e in conflicts)
    assert [e["reason"] for e in entries if e["stage"] == "scan"] == ["missing file"]
    assert query(prefect_db(home), "select state_type from flow_run") == [("FAILED",)]
