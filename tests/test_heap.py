import gc

import pytest

from finetune_lab import heap


@pytest.mark.parametrize("enabled_before", [True, False])
def test_the_collector_pauses_inside_then_skips_what_was_made(enabled_before):
    was = gc.isenabled()
    (gc.enable if enabled_before else gc.disable)()
    try:
        with heap.long_lived():
            assert not gc.isenabled()
            made = [[i] for i in range(1000)]
        assert gc.isenabled() is enabled_before, "the collector is left as it was found"
        frozen = gc.get_objects(generation=None)
        assert not any(obj is made for obj in frozen), "frozen objects are no longer in any generation"
        assert gc.get_freeze_count() >= len(made)  # (left frozen: unfreezing would thaw the whole session's)
    finally:
        (gc.enable if was else gc.disable)()


def test_the_collector_resumes_when_the_block_raises():
    with pytest.raises(RuntimeError), heap.long_lived():
        raise RuntimeError("a failed import")
    assert gc.isenabled()
