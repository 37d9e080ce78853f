"""Silencing warnings in threads that overlap leaves the process's own filters as they were (quiet.py)."""

import threading
import warnings

import numpy as np
import pytest
from PIL import Image

from headstart.data.images import load_image
from headstart.quiet import quiet


def overlap(enter):
    """Thread A enters, thread B enters, A leaves, B leaves: the order in which catch_warnings leaks."""
    steps = [threading.Event() for _ in range(3)]

    def a():
        with enter():
            steps[0].set()
            steps[1].wait(10)
        steps[2].set()

    def b():
        steps[0].wait(10)
        with enter():
            steps[1].set()
            steps[2].wait(10)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert all(s.is_set() for s in steps)


def silenced_by_catch_warnings():
    cm = warnings.catch_warnings()

    class Enter:
        def __enter__(self):
            cm.__enter__()
            warnings.simplefilter("ignore")

        def __exit__(self, *exc):
            cm.__exit__(*exc)

    return Enter()


def test_overlapping_catch_warnings_leave_every_warning_ignored_which_is_why_quiet_exists():
    with warnings.catch_warnings():  # puts this test's damage right on the way out
        before = list(warnings.filters)
        overlap(silenced_by_catch_warnings)
        assert warnings.filters != before
        assert warnings.filters[0][:3] == ("ignore", None, Warning)  # the process now ignores everything


def test_overlapping_quiet_blocks_restore_the_filters():
    before = list(warnings.filters)
    overlap(quiet)
    assert warnings.filters == before
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        warnings.warn("still shown", UserWarning)
    assert [str(w.message) for w in seen] == ["still shown"]


def test_inside_quiet_warnings_are_ignored_and_a_decompression_bomb_warning_is_raised():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet():
            warnings.warn("not shown", UserWarning)
            with pytest.raises(Image.DecompressionBombWarning):
                warnings.warn("too big", Image.DecompressionBombWarning)
        warnings.warn("shown", UserWarning)
    assert [str(w.message) for w in seen] == ["shown"]


@pytest.fixture
def odd_images(tmp_path):
    png = tmp_path / "a.png"
    Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)).save(png)
    jpg = tmp_path / "bad_exif.jpg"  # Pillow warns "Corrupt EXIF data" on this one (test_odd_images.py)
    Image.new("RGB", (8, 6), (200, 0, 0)).save(jpg, exif=b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x05\x00\x12\x01\x03\x00")
    return [png, jpg]


def decode_in_threads(paths, n=2, times=1500):
    errors = []

    def work():
        try:
            for _ in range(times):
                for p in paths:
                    load_image(p)
        except BaseException as exc:  # noqa: BLE001 (reported by the test)
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors


def test_two_threads_decoding_leave_the_filters_as_they_were(odd_images):
    before = list(warnings.filters)
    decode_in_threads(odd_images)
    assert warnings.filters == before
