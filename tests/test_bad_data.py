"""Bad data is skipped, not fatal: a video folder and UDA image domains holding every kind of bad file (and
malformed list lines) keep exactly the good items, warn once per bad file naming it, count the reasons,
and a DataLoader (and a short training run) goes through."""

import json
import logging
import sys
import warnings
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from omniar.data.skipped import DataWarning
from omniar.data.video_folder import VideoFolderDataset
from omniar.data.video_io import write_video
from omniar.train.common import load_yaml
from omniar.uda.data import MAX_CLASSES, load_domain

RNG = np.random.default_rng(0)
TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tokenizer_tiny.yaml"


def colour_frames(t=12, h=40, w=48):
    return RNG.integers(0, 256, (t, h, w, 3), dtype=np.uint8)


def write_with_pyav(path, frames, codec, pix_fmt, fmt, options=None):
    """A video written straight through PyAV: a grayscale pixel format, or the index at the file's start."""
    with av.open(str(path), "w", format="mp4", options=options or {}) as container:
        stream = container.add_stream(codec, rate=8)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format=fmt)))
        container.mux(stream.encode())
    return path


def bad_video_folder(root):
    """Two good videos and one of every bad kind; returns (JSONL, {bad file name: reason})."""
    root.mkdir()
    for name in ("good0.mp4", "good1.mp4"):
        write_video(root / name, colour_frames())
    (root / "empty.mp4").write_bytes(b"")
    whole = write_video(root / "whole.mp4", colour_frames()).read_bytes()
    (root / "whole.mp4").unlink()
    (root / "truncated.mp4").write_bytes(whole[: len(whole) // 2])  # index (moov) at the end: cut off
    (root / "text.mp4").write_text("not a video\n" * 20)
    write_with_pyav(root / "gray.mp4", colour_frames()[..., 0], "png", "gray", "gray")
    write_video(root / "short.mp4", colour_frames(t=4))  # a 9-frame clip needs 9
    write_video(root / "small.mp4", colour_frames(h=16, w=24))  # short side 16 < size 32
    write_video(root / "wide.mp4", colour_frames(h=32, w=160))  # aspect 5 > 4
    # Index at the start, frame data cut off: passes the header check, fails only when decoded.
    fast = write_with_pyav(root / "midcut.mp4", colour_frames(), "libx264", "yuv420p", "rgb24",
                           {"movflags": "faststart"})
    data = fast.read_bytes()
    fast.write_bytes(data[: data.index(b"mdat") + 64])
    bad = {"empty.mp4": "empty", "truncated.mp4": "unreadable", "text.mp4": "unreadable",
           "gray.mp4": "grayscale", "short.mp4": "too_short", "small.mp4": "wrong_size",
           "wide.mp4": "wrong_size", "gone.mp4": "missing"}
    lines = [json.dumps({"video": "good0.mp4", "caption": "first"}),
             "{not json",  # line 2
             json.dumps({"video": "midcut.mp4", "caption": "midcut"}),
             json.dumps({"video": "good1.mp4"}),  # line 4: no caption
             ""]
    lines += [json.dumps({"video": name, "caption": name}) for name in bad]
    lines += [json.dumps({"video": "good1.mp4", "caption": 3}),  # line 14: caption not a string
              json.dumps({"video": "good1.mp4", "caption": "second"})]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root / "data.jsonl", bad


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    return bad_video_folder(tmp_path_factory.mktemp("bad") / "videos")


def skip_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, DataWarning)]


def test_video_folder_skips_each_bad_file_once_and_reports_line_numbers(videos):
    jsonl, bad = videos
    with pytest.warns(DataWarning) as record:
        ds = VideoFolderDataset(jsonl, num_frames=9, size=32, sample="start")
    messages = skip_warnings(record)
    assert len(messages) == len(bad) + 3  # one per bad file and per malformed line, nothing else
    for name in bad:
        assert sum(f"/{name}:" in m for m in messages) == 1, name
    assert [m.split("skipping ")[1].split(":")[0] for m in messages[:3]] == ["line 2", "line 4", "line 14"]
    assert all(m.startswith(f"{jsonl}: skipping ") for m in messages)
    assert [e["caption"] for e in ds.entries] == ["first", "midcut", "second"]
    assert ds.skipped.counts == {"malformed_line": 3, "empty": 1, "unreadable": 2, "grayscale": 1, "too_short": 1,
                                 "wrong_size": 2, "missing": 1}
    assert {ds.skipped.problems[str(jsonl.parent / n)][0] for n in ("small.mp4", "wide.mp4")} == {"wrong_size"}
    assert "skipped 11 (empty: 1, grayscale: 1, malformed_line: 3" in ds.skipped.summary()


def test_video_that_fails_to_decode_is_replaced_by_the_next_item(videos):
    jsonl, _ = videos
    with pytest.warns(DataWarning):
        ds = VideoFolderDataset(jsonl, num_frames=9, size=32, sample="start")
    with pytest.warns(DataWarning, match="skipping .*midcut.mp4: ") as record:
        batches = list(DataLoader(ds, batch_size=2))  # training goes on
        again = ds[1]  # known bad: replaced without decoding (or warning) again
    assert len(skip_warnings(record)) == 1
    assert [c for b in batches for c in b["caption"]] == ["first", "second", "second"]
    assert batches[0]["video"].shape == (2, 3, 9, 32, 32) and again["caption"] == "second"
    assert ds.skipped.counts["decode_error"] == 1 and len(ds) == 3
    with pytest.raises(IndexError):
        ds[3]


def print_every_warning(_worker_id):
    """DataLoader worker init: print each warning (pytest's recorder in a worker's memory would lose them)."""
    warnings.simplefilter("always")
    warnings.showwarning = lambda message, category, *_, **__: print(f"{category.__name__}: {message}",
                                                                     file=sys.stderr)


def test_decode_failures_in_dataloader_workers_are_shared_and_counted_once(videos, capfd):
    jsonl, _ = videos
    with pytest.warns(DataWarning):
        ds = VideoFolderDataset(jsonl, num_frames=9, size=32, sample="start")
    capfd.readouterr()
    for _ in range(2):  # two epochs, fresh worker processes each
        batches = list(DataLoader(ds, batch_size=1, num_workers=2, worker_init_fn=print_every_warning))
        assert [c for b in batches for c in b["caption"]] == ["first", "second", "second"]
    assert capfd.readouterr().err.count("DataWarning: ") == 1  # decoded (and warned about) once in all
    assert ds.decode_failed.tolist() == [False, True, False]
    assert "decode_error" not in ds.skipped.counts  # found in a worker, not in this process ...
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # ... which counts it without warning a second time
        assert ds.collect_decode_failures().counts["decode_error"] == 1
    assert ds.collect_decode_failures().counts["decode_error"] == 1


def test_video_folder_with_no_usable_video_names_the_jsonl(tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "d.jsonl").write_text("oops\n" + json.dumps({"video": "empty.mp4", "caption": "x"}) + "\n")
    with pytest.warns(DataWarning), pytest.raises(ValueError, match=r"root_or_jsonl: .*d.jsonl lists no usable "
                                                                    r"videos \(skipped 2; line 1: not valid JSON"):
        VideoFolderDataset(tmp_path)


def test_tokenizer_training_runs_on_a_folder_with_bad_files(videos, tmp_path, caplog):
    from omniar.train.tokenizer import train

    jsonl, _ = videos
    config = load_yaml(TINY_CONFIG)
    config["data"].update(dataset="video_folder", path=str(jsonl), num_workers=2)
    config["train"].update(out_dir=str(tmp_path / "run"), steps=2, micro_batch_size=2, log_every=1)
    with pytest.warns(DataWarning), caplog.at_level(logging.WARNING, logger="omniar.data"):
        final = train(config, progress=False)
    assert (final / "config.json").is_file()
    summaries = [r.message for r in caplog.records if r.message.startswith("data data: ")]
    # at the start the files found bad from their headers; at the end also midcut.mp4, which a
    # DataLoader worker failed to decode
    assert len(summaries) == 2 and "skipped 11 (" in summaries[0] and "skipped 12 (decode_error: 1" in summaries[1]
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("skipped_files/data")] == [11.0, 12.0]


# ------------------------------------------------------------------ images
def save_image(path, size=(16, 16), mode="RGB"):
    Image.fromarray(RNG.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).convert(mode).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An ImageFolder domain: two good images per class, a grayscale one (kept, as RGB) and one of every
    bad kind; {bad name: reason}."""
    root = tmp_path_factory.mktemp("bad") / "images"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(2):
            save_image(root / c / f"{i}.png")
    (root / "a" / "empty.png").write_bytes(b"")
    (root / "a" / "text.jpg").write_text("not an image\n" * 20)
    save_image(root / "a" / "gray.png", mode="L")
    save_image(root / "b" / "tiny.png", size=(4, 4))
    (root / "b" / "notes.txt").write_text("not an image extension: ignored, as ImageFolder does\n")
    data = save_image(root / "b" / "cut.png", size=(64, 64)).read_bytes()
    (root / "b" / "cut.png").write_bytes(data[: len(data) // 2])  # header fine, pixel data cut off
    return root, {"empty.png": "empty", "text.jpg": "unreadable", "tiny.png": "wrong_size"}


def test_image_domain_skips_bad_images_and_training_continues(images, caplog):
    root, bad = images
    with pytest.warns(DataWarning) as record, caplog.at_level(logging.WARNING, logger="omniar.data"):
        domain = load_domain(root, 16, "--source")
    messages = skip_warnings(record)
    assert len(messages) == len(bad) and all(sum(f"/{n}:" in m for m in messages) == 1 for n in bad)
    assert domain.classes == ["a", "b"] and len(domain) == 6
    assert domain.skipped.counts == {"empty": 1, "unreadable": 1, "wrong_size": 1}
    # grayscale images are converted to RGB, as BiPC's reference does, and counted once
    assert domain.grayscale == 1 and [r.message for r in caplog.records] == \
        [f"{root}: 1 of 6 images are grayscale; they are converted to RGB"]
    gray = [p.name for p, _ in domain.items].index("gray.png")
    assert domain[gray][0].shape == (3, 16, 16)
    with pytest.warns(DataWarning, match="cut.png"):
        labels = [y for _, ys in DataLoader(domain, batch_size=2) for y in ys.tolist()]
    assert labels == [0, 0, 0, 1, 1, 0]  # cut.png (the last item) replaced by the next one, wrapping to the first
    assert domain.skipped.counts["decode_error"] == 1


def test_image_folder_symlinks_are_not_followed_and_each_file_counts_once(tmp_path):
    root = tmp_path / "domain"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        save_image(root / c / "0.png")
    (root / "a" / "loop").symlink_to(".")  # followed, this turned 3 images into 123 items
    (root / "b" / "up").symlink_to("..")  # back into the tree
    (root / "b" / "out").symlink_to(tmp_path)  # out of the tree
    (root / "b" / "again.png").symlink_to(root / "b" / "0.png")
    (root / "c").symlink_to(root / "a")  # a class folder that is a link
    with pytest.warns(DataWarning) as record:
        domain = load_domain(root, 16)
    assert [(p.name, y) for p, y in domain.items] == [("0.png", 0), ("0.png", 1)] and domain.classes == ["a", "b"]
    assert domain.skipped.counts == {"dir_symlink": 4, "duplicate": 1} and len(skip_warnings(record)) == 5


def test_image_list_labels_are_bounded_ascii_integers(images, tmp_path):
    root, _ = images
    good = root / "a" / "0.png"
    lines = [f"{good} 1", f"{good} 100000000", f"{good} \u00b2", f"{good} {'9' * 5000}", f"{good} {MAX_CLASSES - 1}"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.warns(DataWarning) as record:
        domain = load_domain(tmp_path / "list.txt", 16)
    assert [m.split("skipping ")[1].split(":")[0] for m in skip_warnings(record)] == ["line 2", "line 3", "line 4"]
    assert all(f"label an integer 0..{MAX_CLASSES - 1}" in m for m in skip_warnings(record))
    assert [y for _, y in domain.items] == [1, MAX_CLASSES - 1] and len(domain.classes) == MAX_CLASSES


def test_image_list_reports_line_numbers_and_missing_images(images, tmp_path):
    root, _ = images
    lines = [f"{root / 'a' / '0.png'} 0", "no_label.png", f"{root / 'a' / 'gray.png'} 1", "gone.png 1",
             f"{root / 'b' / '0.png'} -1", f"{root / 'b' / '1.png'} 2"]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        domain = load_domain(tmp_path / "list.txt", 16)
    messages = skip_warnings(record)
    assert [m.split("skipping ")[1].split(":")[0] for m in messages[:2]] == ["line 2", "line 5"]
    assert domain.skipped.counts == {"malformed_line": 2, "missing": 1} and len(messages) == 3
    assert domain.classes == ["0", "1", "2"] and [y for _, y in domain.items] == [0, 1, 2]


def test_uda_training_logs_skip_counts(images, tmp_path, caplog):
    from omniar.uda.train import UDAConfig, train_uda

    root, _ = images
    with pytest.warns(DataWarning):
        src, tgt = load_domain(root, 16), load_domain(root, 16)
    cfg = UDAConfig(method="source_only", backbone="resnet10t", pretrained_classes=5, epochs=1, steps_per_epoch=1,
                    batch_size=2, out_dir=str(tmp_path))
    # evaluating the whole target meets cut.png, which fails to decode: warned about, training goes on
    with caplog.at_level(logging.WARNING, logger="omniar.data"), pytest.warns(DataWarning, match="cut.png"):
        result = train_uda(cfg, src, tgt)
    assert 0.0 <= result["last"] <= 100.0
    logged = [r.message for r in caplog.records if "skipped 3 (" in r.message]
    assert [m.split(" data: ")[0] for m in logged] == ["source", "target"]  # once each, before the first step
