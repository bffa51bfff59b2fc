"""A serving process's garbage-collector tuning (OPENSENSE_GC_GEN0, serving.gc_on_startup)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest
from aiohttp import web

from opensense.serving import gc_on_startup
from opensense.settings import Config


@pytest.fixture
def gc_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic collector frees it


async def test_startup_freezes_what_exists_and_raises_the_threshold(gc_restored: None) -> None:
    _, gen1, gen2 = gc.get_threshold()
    await gc_on_startup(5000)(web.Application())
    assert gc.get_threshold() == (5000, gen1, gen2)
    assert gc.get_freeze_count() > 1000  # the modules' objects, at least


async def test_garbage_in_cycles_is_still_collected_without_a_call(gc_restored: None) -> None:
    await gc_on_startup(1000)(web.Application())
    node = _Node()
    gone = weakref.ref(node)
    del node
    assert gone() is not None  # held by its own cycle
    junk = [[i] for i in range(5000)]  # allocations past the threshold: a pass runs
    assert gone() is None
    del junk


async def test_zero_leaves_python_defaults(gc_restored: None) -> None:
    before = gc.get_threshold()
    gc.unfreeze()
    await gc_on_startup(0)(web.Application())
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_the_default_is_on() -> None:
    assert Config().gc_gen0 == 50000
