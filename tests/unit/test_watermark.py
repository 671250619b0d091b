import pytest

from invoker.watermark import Hysteresis


def test_pauses_at_high_and_resumes_only_at_low():
    h = Hysteresis(high=10, low=4)
    assert [h.update(v) for v in (0, 9, 10, 9, 5, 4, 5, 9)] == [
        False, False, True, True, True, False, False, False]


def test_rejects_inverted_marks():
    with pytest.raises(ValueError):
        Hysteresis(high=4, low=4)
