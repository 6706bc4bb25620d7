"""The training mapper counts the annotations it drops (zero-area boxes, phrases past the
256-token limit, categories left out of the caption), warns about them at a limited rate, and
hands the counts to the training log (``put_dropped_scalars``), from DataLoader workers too."""

import logging
import re

import numpy as np
import pytest
import torch
from detectron2.data.build import trivial_batch_collator
from detectron2.data.common import MapDataset
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage
from PIL import Image

from grounding_dino.data.mapper import DROP_REASONS, GroundingDatasetMapper, put_dropped_scalars
from grounding_dino.text import count_tokens, load_tokenizer

LOGGER = "grounding_dino.data.mapper"
# 40 categories of about 10 tokens each: at most about 25 fit in a 256-token caption.
LONG_CLASSES = [f"thermoregulation electroencephalography number {i}" for i in range(40)]


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    return load_tokenizer(minilm_dir)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(np.full((60, 80, 3), 128, dtype=np.uint8)).save(path)
    return str(path)


def _mapper(tokenizer, period, **kwargs):
    return GroundingDatasetMapper(
        True,
        augmentations=[],
        tokenizer=tokenizer,
        thing_classes=LONG_CLASSES,
        drop_warning_period=period,
        **kwargs,
    )


def _box(bbox, **fields):
    return {"bbox": list(bbox), "bbox_mode": BoxMode.XYXY_ABS, **fields}


def _zero_area_record(file_name):
    """Detection: one good box, one of zero width and one outside the 80x60 image."""
    boxes = [(2, 3, 30, 40), (10, 10, 10, 30), (90, 10, 120, 20)]
    annotations = [_box(b, category_id=i) for i, b in enumerate(boxes)]
    return {
        "file_name": file_name,
        "height": 60,
        "width": 80,
        "image_id": 1,
        "annotations": annotations,
    }


def _long_phrase_record(file_name):
    """Grounding: "a dog" at the start, "the ball" after about 300 tokens."""
    caption = "a dog " + "and a cat " * 100 + "the ball"
    start = caption.index("the ball")
    annotations = [
        _box((2, 3, 30, 40), tokens_positive=[[0, 5]]),
        _box((40, 5, 70, 50), tokens_positive=[[start, start + 8]]),
    ]
    return {
        "file_name": file_name,
        "height": 60,
        "width": 80,
        "image_id": 2,
        "caption": caption,
        "annotations": annotations,
    }


def _overflow_record(file_name):
    """Detection: one box of each of the 40 long categories (they cannot all be named)."""
    annotations = [_box((2 + i % 30, 3, 40 + i % 30, 40), category_id=i) for i in range(40)]
    return {
        "file_name": file_name,
        "height": 60,
        "width": 80,
        "image_id": 3,
        "annotations": annotations,
    }


def _warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_each_reason_is_counted_and_warned_at_once(tokenizer, image_file, caplog):
    mapper = _mapper(tokenizer, period=1000)
    np.random.seed(0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        zero = mapper(_zero_area_record(image_file))
        assert zero["dropped"] == {"zero_area": 2} and len(zero["instances"]) == 1
        (message,) = _warnings(caplog)
        assert "dropped 2 training annotations so far (zero_area: boxes with zero area" in message
        assert "zero_area=2, past_token_limit=0, category_overflow=0 of 3 boxes in 1 images" in (
            message
        )
        assert "image_id=1" in message

        long = mapper(_long_phrase_record(image_file))
        # Independent check: "the ball" starts past the 256-token window of the caption.
        prefix = long["caption"][: long["caption"].index("the ball")]
        assert count_tokens(tokenizer, prefix) > 256
        assert long["dropped"] == {"past_token_limit": 1} and len(long["instances"]) == 1
        message = _warnings(caplog)[-1]
        assert (
            "dropped 1 training annotations so far (past_token_limit: objects whose phrase"
            in message
        )
        assert "zero_area=2, past_token_limit=1, category_overflow=0 of 5 boxes in 2 images" in (
            message
        )

        overflow = mapper(_overflow_record(image_file))
        named = overflow["caption"][: -len(" .")].split(" . ")
        assert 10 < len(named) < 40 and count_tokens(tokenizer, overflow["caption"]) <= 256
        # Every category is positive (one box each): the boxes kept are those named.
        assert len(overflow["instances"]) == len(named)
        expected = 40 - len(named)
        assert overflow["dropped"] == {"category_overflow": expected}
        message = _warnings(caplog)[-1]
        assert (
            f"dropped {expected} training annotations so far (category_overflow: boxes whose"
            in message
        )
        assert (
            f"zero_area=2, past_token_limit=1, category_overflow={expected} of 45 boxes in 3 "
            "images" in message
        )
    assert len(_warnings(caplog)) == 3
    assert mapper.drops.counts == {
        "zero_area": 2,
        "past_token_limit": 1,
        "category_overflow": expected,
    }
    assert mapper.drops.images == 3 and mapper.drops.boxes == 45


def test_warnings_are_rate_limited_per_reason(tokenizer, image_file, caplog):
    mapper = _mapper(tokenizer, period=3)
    zero, long = _zero_area_record(image_file), _long_phrase_record(image_file)
    # Images 1..7: the zero-area record on 1, 2, 3, 5, 6, 7 and the long phrase on 4.
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        for record in (zero, zero, zero, long, zero, zero, zero):
            mapper(record)
    messages = _warnings(caplog)
    reasons = [re.search(r"so far \((\w+):", m).group(1) for m in messages]
    # zero_area at image 1 (first), then not before image 4 (1 + 3): its next drop is image 5;
    # past_token_limit at image 4 (its first). Image 6 and 7 fall within 3 images of image 5.
    assert reasons == ["zero_area", "past_token_limit", "zero_area"]
    assert "dropped 2 training" in messages[0] and "in 1 images" in messages[0]
    assert "dropped 1 training" in messages[1] and "in 4 images" in messages[1]
    assert "dropped 8 training" in messages[2] and "in 5 images" in messages[2]
    assert "zero_area=8, past_token_limit=1, category_overflow=0 of 14 boxes" in messages[2]
    assert mapper.drops.counts["zero_area"] == 12


def test_nothing_dropped_no_warning(tokenizer, image_file, caplog):
    record = _zero_area_record(image_file)
    record["annotations"] = record["annotations"][:1]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = _mapper(tokenizer, period=1)(record)
    assert out["dropped"] == {} and len(out["instances"]) == 1 and not _warnings(caplog)


def test_bad_period_is_refused(tokenizer):
    with pytest.raises(ValueError, match="drop_warning_period must be >= 1"):
        _mapper(tokenizer, period=0)


def test_counts_from_dataloader_workers_reach_the_event_storage(tokenizer, image_file, caplog):
    records = [_zero_area_record(image_file), _long_phrase_record(image_file)] * 3
    loader = torch.utils.data.DataLoader(
        MapDataset(records, _mapper(tokenizer, period=1000)),
        batch_size=2,
        num_workers=2,
        collate_fn=trivial_batch_collator,
    )
    totals = []
    with EventStorage() as storage:
        for batch in loader:
            counts = put_dropped_scalars(batch)
            assert counts == {
                "zero_area": 2,
                "past_token_limit": 1,
                "category_overflow": 0,
                "boxes_seen": 5,
            }
            totals.append(storage.latest()["data/dropped_zero_area"][0])
            storage.step()
        latest = storage.latest()
    assert totals == [2, 4, 6]  # running totals over the batches
    assert latest["data/dropped_past_token_limit"][0] == 3
    assert latest["data/dropped_category_overflow"][0] == 0
    assert latest["data/boxes_seen"][0] == 15
    assert set(DROP_REASONS) == {"zero_area", "past_token_limit", "category_overflow"}


def test_put_dropped_scalars_without_storage(tokenizer, image_file):
    out = _mapper(tokenizer, period=1000)(_zero_area_record(image_file))
    assert put_dropped_scalars([out, out])["zero_area"] == 4  # no storage active: no error
    with EventStorage() as storage:  # records of another mapper: nothing logged
        put_dropped_scalars([{"image": out["image"], "instances": out["instances"]}])
        assert not storage.latest()
