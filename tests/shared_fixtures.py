"""Fixtures several test files share, registered for the whole session by ``pytest_plugins``
in conftest.py (a fixture imported from a helper module is not seen by pytest).

None of them is autouse, so registering them changes nothing for a file that does not ask:
a file opts in by naming a fixture as an argument or in ``pytest.mark.usefixtures``, and a
file that defines a fixture of the same name keeps its own. The demo imports sit inside the
fixtures so that a session which never asks for them does not load transformers.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models gain nothing from intra-op threads, and on a shared CPU spinning
    OpenMP threads slow them down several times over."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def processor():
    """The demo task's processor: the tiny Qwen2.5-VL image processor and a word-level
    tokenizer over the task's words."""
    from saei_fast.tools.demo.model import demo_processor
    from saei_fast.tools.demo.task import task_words

    return demo_processor(task_words())


@pytest.fixture(scope="module")
def examples():
    """Two colour-task examples (one image each), the same in every file that asks."""
    from saei_fast.tools.demo.task import colour_examples

    return colour_examples(2, seed=3)
