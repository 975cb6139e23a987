import pytest

from moba_train.data.corpus import train_tokenizer

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
    "import os\nprint(os.getcwd())\n",
    "Long-context training needs long documents. " * 20,
]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A small byte-level BPE tokenizer (EOS <|endoftext|> = 0), trained once per test session."""
    return train_tokenizer(TEXTS * 5, 300, tmp_path_factory.mktemp("tok") / "tokenizer")
